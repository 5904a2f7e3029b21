"""The differential fuzzer on the pallas kernels as a JAX user's `jax.jit` reaches them: every array argument
traced, at its own shape (no shape buckets), so the bounds the kernels derive from shapes alone are the only
ones (a short bound once dropped rows that the bucket padding of eager calls happened to cover)."""
import jax
import pytest

from portable_attn.backends.pallas import bridge, ops
from portable_attn.conformance import fuzz
from portable_attn.optable import NAMES

EXAMPLES = {"attention": 4, "paged_attention": 4, "sparse_attention": 3}  # the tiled kernels; 2 for the others


class _Whole:
    """The Cut of an unpadded call: nothing to trim."""

    @staticmethod
    def tokens(x):
        return x

    lse = states = tokens


def _traced(op, fn, args):
    a = bridge.arguments(args)
    arrays = {n: x for n, x in a.items() if isinstance(x, jax.Array)}
    static = {n: x for n, x in a.items() if n not in arrays}
    return jax.jit(lambda **traced: fn(**traced, **static))(**arrays), _Whole()


@pytest.mark.parametrize("op", NAMES)
def test_fuzz_under_jit_finds_no_wrong_answer(op, monkeypatch, fuzz_examples):
    monkeypatch.setattr(ops, "_run", _traced)
    examples = fuzz_examples or EXAMPLES.get(op, 2)
    results = fuzz.run_fuzz(["pallas"], examples, ops=[op])
    assert len(results) == examples
    bad = [f"{r.status} [{r.dtype}] {r.case}: {r.detail}" for r in results if r.status in ("fail", "error")]
    assert not bad, "\n".join(bad)
