"""A differential fuzzer: Hypothesis draws valid inputs for each op, the arguments of the catalogue's own
case builders (ragged varlen batches with empty and one-token sequences, GQA ratios, odd head dims,
windows, softcap, sinks, block masks, paged caches with odd block sizes and `seqused_k = 0`, state caches
with permuted and -1 rows, -inf / -1e4 decays) plus strided views, poisoned invisible memory and with or
without `out=`. Each example runs through the conformance runner (`run_case`): float64 oracle, tolerance,
NaN-filled outputs, untouched rows.

A result's `case` is the recipe of its example: the builder call, then `+layout`, `+poison`, `-out`
and `#n`. The values are drawn from a generator seeded by that name (`runner.seed_of`), so
`example(name)` rebuilds the example exactly, to rerun a failure with `run_case`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

try:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hypothesis_seed
except ImportError as exc:  # a dev dependency, not one of the library's
    raise ImportError("the conformance fuzzer needs hypothesis: pip install 'portable-attn[fuzz]'") from exc

from .. import registry
from ..optable import NAMES, OPS
from . import cases
from .runner import Result, run_case
from .tensors import LAYOUTS

DTYPES = ("float32", "float16", "bfloat16")


def _describe(fn: Callable, args, kwargs) -> str:
    words = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{fn.__name__}({', '.join(words)})"


class Recipe:
    """A builder call whose repr is the call itself (for a readable, reproducible case name)."""

    def __init__(self, fn: Callable, *args, **kwargs):
        self.value, self.text = fn(*args, **kwargs), _describe(fn, args, kwargs)

    def __repr__(self):
        return self.text


def _build(fn, *args, **kwargs) -> cases.Case:
    """A builder's case, named by its call."""
    case = fn(*[a.value if isinstance(a, Recipe) else a for a in args],
              **{k: v.value if isinstance(v, Recipe) else v for k, v in kwargs.items()})
    return dataclasses.replace(case, name=_describe(fn, args, kwargs))


# ---- shared pieces -----------------------------------------------------------------------------

LENGTH = st.one_of(st.sampled_from([0, 1, 1, 2]), st.integers(0, 72))


@st.composite
def _lengths(draw, n=None):
    """`n` (else 1-4, or up to 12 short ones) sequence lengths: any, short (an engine's decode batch), or
    all alike (a padded batch, packed)."""
    kind = draw(st.sampled_from(["any", "any", "short", "alike"]))
    n = n or draw(st.integers(1, 12 if kind == "short" else 4))
    if kind == "alike":
        return [draw(LENGTH)] * n
    return draw(st.lists(st.integers(0, 3) if kind == "short" else LENGTH, min_size=n, max_size=n))


@st.composite
def _heads(draw, ratios=(1, 2, 3, 4)):
    hkv = draw(st.sampled_from([1, 2, 3]))
    return hkv * draw(st.sampled_from(ratios)), hkv


HEAD_DIM = st.sampled_from([1, 3, 8, 16, 24, 32, 40, 64, 80, 96])
WINDOW = st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 24), st.integers(-1, 6)))


@st.composite
def _mask(draw, nseq, heads):
    """None or a random layout (empty, partial and full blocks) per sequence, per head or shared."""
    if draw(st.booleans()):
        return None
    block = draw(st.sampled_from([(16, 16), (8, 16), (16, 32), (4, 8), (64, 64), (24, 80)]))  # under, at, over 64
    per_head = draw(st.booleans())
    return Recipe(cases._random_layout, draw(st.integers(0, 99)), nseq, heads if per_head else 1, block)


@st.composite
def _attention_options(draw, nseq, hq):
    return {"window": draw(WINDOW), "softcap": draw(st.sampled_from([0.0, 0.0, 5.0, 30.0])),
            "sinks": draw(st.booleans()), "mask": draw(_mask(nseq, hq))}


# ---- per op ------------------------------------------------------------------------------------

@st.composite
def _attention(draw):
    hq, hkv = draw(_heads())
    lq = draw(_lengths())
    lk = draw(_lengths(len(lq)))
    if len(set(lq)) == 1 and draw(st.booleans()):  # queries alike: keys alike too (one batch of one shape)
        lk = [lk[0]] * len(lk)
    if len(lq) == 1 and draw(st.booleans()):  # one sequence without cu_seqlens
        lq, lk = lq[0], lk[0]
    return _build(cases.attention_case, "fuzz", lq, lk, hq=hq, hkv=hkv, d=draw(HEAD_DIM),
                  dv=draw(st.one_of(st.none(), HEAD_DIM)), causal=draw(st.booleans()),
                  scale=draw(st.sampled_from([None, None, 0.0, 0.3])),
                  **draw(_attention_options(1 if isinstance(lq, int) else len(lq), hq)))


@st.composite
def _paged(draw):
    hq, hkv = draw(_heads())
    lk = draw(_lengths())
    lq = draw(st.one_of(st.none(), _lengths(len(lk))))
    return _build(cases.paged_case, "fuzz", lk, lq, bs=draw(st.sampled_from([1, 2, 3, 5, 7, 8, 16, 17])), hq=hq,
                  hkv=hkv, d=draw(HEAD_DIM), dv=draw(st.one_of(st.none(), HEAD_DIM)), causal=draw(st.booleans()),
                  **draw(_attention_options(len(lk), hq)))


@st.composite
def _write_kv(draw):
    t, bs = draw(st.integers(0, 24)), draw(st.sampled_from([1, 3, 5, 16]))
    nb = draw(st.integers(-(-t // bs), -(-t // bs) + 3))
    return _build(cases.write_kv_case, "fuzz", t, nb=nb, bs=bs, hkv=draw(st.sampled_from([1, 2, 3])),
                  d=draw(HEAD_DIM), skip=draw(st.integers(0, t)))


@st.composite
def _sparse(draw):
    hq, hkv = draw(_heads())
    lq = draw(_lengths())
    lk = draw(_lengths(len(lq)))
    return _build(cases.sparse_case, "fuzz", lq, lk, topk=draw(st.integers(0, 9)), hq=hq, hkv=hkv, d=draw(HEAD_DIM),
                  causal_indices=draw(st.booleans()), sinks=draw(st.booleans()),
                  softcap=draw(st.sampled_from([0.0, 8.0])), empty_rows=draw(st.integers(0, 2)),
                  unlisted_ends=draw(st.booleans()))


KEY_DIM = st.sampled_from([1, 5, 8, 16, 24, 32, 48])


@st.composite
def _tokens(draw, op):
    """(the op's token maker as a Recipe, state tail)."""
    if op.startswith("linear_attention"):
        h, k, v = draw(st.integers(1, 3)), draw(KEY_DIM), draw(KEY_DIM)
        gate = draw(st.sampled_from([None, "head", "key", "strong", "edge", "edge_key"]))
        return Recipe(cases.linear_tokens, h, k, v, gate), (h, k, v)
    if op.startswith("gated_delta_rule"):
        h, k, v = draw(st.integers(1, 2)), draw(KEY_DIM), draw(KEY_DIM)
        hv = h * draw(st.sampled_from([1, 2, 3]))
        gate = draw(st.sampled_from(["head", "key", "strong", "edge", "edge_key"]))
        return Recipe(cases.delta_tokens, h, hv, k, v, gate, draw(st.booleans())), (hv, k, v)
    if op.startswith("ssd"):
        g = draw(st.integers(1, 2))
        h, p, n = g * draw(st.integers(1, 3)), draw(KEY_DIM), draw(st.sampled_from([1, 4, 16]))
        softplus = draw(st.booleans())
        maker = Recipe(cases.ssd_tokens, h, g, p, n, d_shape=draw(st.sampled_from([None, "head", "head_p"])),
                       z=draw(st.booleans()), bias=draw(st.booleans()), softplus=softplus,
                       limit=draw(st.sampled_from([(0.0, float("inf")), (0.01, 0.5)])),
                       strong=draw(st.booleans()), edge=draw(st.booleans()))
        return maker, (h, p, n)
    c, w = draw(st.sampled_from([1, 7, 16, 40])), draw(st.integers(1, 5))
    return Recipe(cases.conv_tokens, c, w, bias=draw(st.booleans()), act=draw(st.sampled_from([None, "silu"]))), \
        (c, w - 1)


def _state_dtype(draw, op):
    return True if op.startswith("causal_conv1d") else draw(st.booleans())  # conv states: activation dtype


@st.composite
def _recurrent(draw, op):
    maker, tail = draw(_tokens(op))
    lens = draw(_lengths())
    return _build(cases.recurrent_case, op, "fuzz", lens, maker, tail,
                  state=draw(st.sampled_from([None, "initial", "cache"])),
                  state_in_act_dtype=_state_dtype(draw, op))


@st.composite
def _step(draw, op):
    maker, tail = draw(_tokens(op))
    bsz = draw(st.integers(0, 6))
    return _build(cases.step_case, op, "fuzz", bsz, maker, tail, slots=bsz + draw(st.integers(0, 3)),
                  skip=draw(st.booleans()), state_in_act_dtype=_state_dtype(draw, op))


@st.composite
def _merge(draw):
    split = draw(st.one_of(st.none(), st.integers(0, 12)))
    t = draw(st.integers(0, 30)) if split is None else split + draw(st.integers(0, 20))
    return _build(cases.merge_case, "fuzz", t, h=draw(st.integers(1, 6)), dv=draw(HEAD_DIM),
                  empty=draw(st.sampled_from([0.0, 0.3, 1.0])), sinks=draw(st.booleans()),
                  spread=draw(st.sampled_from([1.0, 3.0, 40.0])), split=split)


def case_strategy(op: str) -> st.SearchStrategy[cases.Case]:
    """Valid cases of `op`, each with a drawn layout, poison, out= and value seed."""
    if OPS[op].is_step:
        base = _step(op)
    elif OPS[op].step:
        base = _recurrent(op)
    else:
        base = {"attention": _attention(), "paged_attention": _paged(), "write_kv_cache": _write_kv(),
                "sparse_attention": _sparse(), "merge_attention_states": _merge()}[op]
    return st.builds(_flag, base, st.sampled_from((None,) + LAYOUTS), st.booleans(), st.booleans(),
                     st.integers(0, 9999))


def _flag(case: cases.Case, layout, poison: bool, use_out: bool, n: int) -> cases.Case:
    name = case.name + (f"+{layout}" if layout else "") + ("+poison" if poison else "") + \
        ("" if use_out else "-out") + f"#{n}"
    return dataclasses.replace(case, name=name, layout=layout, poison=poison, use_out=use_out, variant=None,
                               invariant="", deterministic=False, tiers=())


_FLAGS = re.compile(r"(?:\+(gaps|transposed))?(\+poison)?(-out)?#(\d+)$")
_CASE_BUILDERS = (cases.attention_case, cases.paged_case, cases.write_kv_case, cases.sparse_case,
                  cases.merge_case, cases.recurrent_case, cases.step_case)
_PART_BUILDERS = (cases.linear_tokens, cases.delta_tokens, cases.ssd_tokens, cases.conv_tokens, cases._random_layout)


def example(name: str) -> cases.Case:
    """The case a fuzz result's name describes (the recipe is evaluated with the builders only)."""
    flags = _FLAGS.search(name)
    if flags is None:
        raise ValueError(f"name: expected a fuzz example's name ending in '#<n>', got {name!r}")
    scope = ({fn.__name__: functools.partial(_build, fn) for fn in _CASE_BUILDERS}
             | {fn.__name__: functools.partial(Recipe, fn) for fn in _PART_BUILDERS} | {"inf": math.inf})
    case = eval(name[:flags.start()], {"__builtins__": {}}, scope)  # noqa: S307 - the builders' own calls
    return _flag(case, flags[1], bool(flags[2]), not flags[3], int(flags[4]))


# ---- the run ------------------------------------------------------------------------------------

def run_fuzz(backends: list[str], examples: int, seed: int | None = None, ops=None,
             progress: Callable[[Result], None] | None = None) -> list[Result]:
    """`examples` drawn inputs per op, each run on every backend: one Result per example and backend.

    `seed=None` is Hypothesis' derandomized stream (the same examples on every run); an int picks
    another, equally reproducible one. Nothing is written to a Hypothesis database."""
    results: list[Result] = []
    for op in ops or NAMES:
        _fuzz_op(op, list(backends), examples, seed, results, progress)
    return results


def _fuzz_op(op, backends, examples, seed, results, progress) -> None:
    @settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None,
              phases=[Phase.generate], print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(case=case_strategy(op), dtype=st.sampled_from(DTYPES))
    def body(case, dtype):
        for backend in backends:
            res = run_case(backend, case, dtype)
            registry.get(backend).release()
            results.append(res)
            if progress:
                progress(res)

    if seed is not None:
        body = hypothesis_seed(seed)(body)
    if examples > 0:
        body()
