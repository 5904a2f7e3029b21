"""The op table is the one declaration of each op: the public functions, the JAX front and the
torch.library schemas agree with it."""
import inspect

import pytest
import torch

import portable_attn as pa
from portable_attn import library  # noqa: F401  (registers the custom ops)
from portable_attn.optable import NAMES, OPS, REQUIRED


def _declared(decl, drop=()):
    return [(a.name, a.value, a.keyword) for a in decl.args if a.name not in drop]


def _signature(fn, drop=()):
    kinds = (inspect.Parameter.KEYWORD_ONLY,)
    return [(p.name, REQUIRED if p.default is inspect.Parameter.empty else p.default, p.kind in kinds)
            for p in inspect.signature(fn).parameters.values() if p.name not in drop]


@pytest.mark.parametrize("op", NAMES)
def test_public_function_matches_its_declaration(op):
    assert _signature(getattr(pa, op), drop=("backend",)) == _declared(OPS[op])
    assert list(inspect.signature(getattr(pa, op)).parameters)[-1] == "backend"


@pytest.mark.parametrize("op", NAMES)
def test_jax_front_matches_its_declaration(op):
    jax_front = pytest.importorskip("portable_attn.jax", reason="jax not installed (pip install -e '.[pallas-interpret]')")
    assert _signature(getattr(jax_front, op)) == _declared(OPS[op], drop=("out",))


@pytest.mark.parametrize("op", NAMES)
def test_custom_op_schema_follows_the_declaration(op):
    schema = getattr(torch.ops.portable_attn, op).default._schema
    names = [a.name for a in schema.arguments]
    mask = ["mask_layout", "mask_index", "mask_masks", "mask_block", "mask_seq_len"]
    want = [n for a in OPS[op].args for n in (mask if a.type == "BlockMask?" else [a.name])
            if n not in ("out", "return_lse")] + ["backend"] + (["out"] if OPS[op].family != "cache" else [])
    assert names == want
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == set(OPS[op].mutates) | ({"out"} if OPS[op].family != "cache" else set())


def test_step_and_sequence_forms_pair_up():
    for name, decl in OPS.items():
        if decl.step:
            assert OPS[decl.step].sequence == name and OPS[decl.step].primary == decl.primary
        assert decl.primary in decl.names and set(decl.mutates) <= set(decl.names)
