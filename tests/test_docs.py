"""The public ops' docstrings: every argument, its shape in SPEC's letters, the dtypes, the return value and
an example that runs (doctest)."""
import doctest
import inspect
import re

import pytest

import portable_attn as pa
import portable_attn.ops
from portable_attn.backend import OPS

# SPEC's shapes (docs/spec.md), per op: argument or returned value -> shape
ATTN = {"q": "[Tq, Hq, D]", "o": "[Tq, Hq, Dv]", "lse": "[Hq, Tq]", "sinks": "[Hq]", "cu_seqlens_q": "[S+1]",
        "out": "[Tq, Hq, Dv]"}
KV = {"k": "[Tk, Hkv, D]", "v": "[Tk, Hkv, Dv]"}
CACHE = {"k_cache": "[NB, BS, Hkv, D]", "v_cache": "[NB, BS, Hkv, Dv]"}
SHAPES = {
    "attention": dict(ATTN, **KV, cu_seqlens_k="[S+1]"),
    "paged_attention": dict(ATTN, **CACHE, block_table="[S, max_blocks]", seqused_k="[S]"),
    "write_kv_cache": dict(k="[T, Hkv, D]", v="[T, Hkv, Dv]", **CACHE, slot_mapping="[T]"),
    "sparse_attention": dict(ATTN, **KV, indices="[Tq, Hkv, topk]"),
    "merge_attention_states": dict(o_a="[T, H, Dv]", lse_a="[H, T]", o_b="[T, H, Dv]", lse_b="[H, T]", sinks="[H]",
                                   o="[T, H, Dv]", lse="[H, T]", out="[T, H, Dv]"),
    "linear_attention": dict(q="[T, H, K]", k="[T, H, K]", v="[T, H, V]", g="[T, H, K]", initial_state="[S, H, K, V]",
                             state_indices="[S]", has_initial_state="[S]", cu_seqlens="[S+1]", out="[T, H, V]"),
    "linear_attention_step": dict(q="[bsz, H, K]", k="[bsz, H, K]", v="[bsz, H, V]", g="[bsz, H]",
                                  state="[slots, H, K, V]", state_indices="[bsz]", out="[bsz, H, V]"),
    "gated_delta_rule": dict(q="[T, H, K]", v="[T, Hv, V]", g="[T, Hv]", beta="[T, Hv]",
                             initial_state="[S, Hv, K, V]", cu_seqlens="[S+1]", out="[T, Hv, V]"),
    "gated_delta_rule_step": dict(q="[bsz, H, K]", v="[bsz, Hv, V]", g="[bsz, Hv]", beta="[bsz, Hv]",
                                  state="[slots, Hv, K, V]", out="[bsz, Hv, V]"),
    "ssd": dict(x="[T, H, P]", dt="[T, H]", A="[H]", B="[T, G, N]", C="[T, G, N]", D="[H, P]", z="[T, H, P]",
                dt_bias="[H]", initial_state="[S, H, P, N]", cu_seqlens="[S+1]", out="[T, H, P]"),
    "ssd_step": dict(x="[bsz, H, P]", dt="[bsz, H]", B="[bsz, G, N]", C="[bsz, G, N]", z="[bsz, H, P]",
                     state="[slots, H, P, N]", out="[bsz, H, P]"),
    "causal_conv1d": dict(x="[T, C]", weight="[C, W]", bias="[C]", initial_state="[S, C, W-1]", out="[T, C]"),
    "causal_conv1d_step": dict(x="[bsz, C]", weight="[C, W]", bias="[C]", state="[slots, C, W-1]", out="[bsz, C]"),
}
INDEX_ARGS = {"cu_seqlens", "cu_seqlens_q", "block_table", "seqused_k", "indices", "state_indices", "slot_mapping"}


def doc(op: str) -> str:
    return inspect.getdoc(getattr(pa, op))


def section(text: str, title: str) -> str:
    """The indented block under `title:` (Args, Returns)."""
    m = re.search(rf"^{title}:\n((?:    .*\n|\n)+)", text + "\n", re.M)
    assert m, f"no {title}: section"
    return m.group(1)


def test_every_op_is_covered():
    assert set(SHAPES) == set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_docstring_names_shapes_dtypes_and_returns(op):
    text = doc(op)
    for name, shape in SHAPES[op].items():
        # the name documented (`q [..`, `beta: ..`) on the line that gives its shape
        assert re.search(rf"(^|[\s(`,]){name}(?=:| \[|,)[^\n]*{re.escape(shape)}", text, re.M), f"{name} {shape}"
    args = section(text, "Args")
    for param in inspect.signature(getattr(pa, op)).parameters:
        assert re.search(rf"(^|[\s,]){param}(:| \[|,)", args, re.M), f"argument {param} is not documented"
    assert "float32" in text
    if INDEX_ARGS & set(inspect.signature(getattr(pa, op)).parameters):
        assert "int32" in text
    returns = section(text, "Returns")
    assert ("None" if op == "write_kv_cache" else "`") in returns
    if op == "write_kv_cache" or {"state", "initial_state"} & set(SHAPES[op]):
        assert "in place" in text


EXAMPLES = {t.name.rsplit(".", 1)[-1]: t for t in doctest.DocTestFinder().find(portable_attn.ops)}


@pytest.mark.parametrize("op", OPS)
def test_docstring_example_runs(op):
    test = EXAMPLES.get(op)
    assert test is not None and len(test.examples) >= 3, f"{op} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
