"""The differential fuzzer on every backend this process can run (cpu and reference in the plain run;
triton with TRITON_INTERPRET=1 PORTABLE_ATTN_INTERPRET=1; pallas with PORTABLE_ATTN_INTERPRET=1
JAX_PLATFORMS=cpu): drawn inputs of all twelve ops against the float64 reference. A small budget in CI,
`--fuzz-examples N` for a longer hunt."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from portable_attn.conformance import fuzz, invisible, tensors
from portable_attn.conformance.runner import IN_PLACE, call, run_case, seed_of
from portable_attn.conformance.suite import available_backends
from portable_attn.optable import NAMES as OPS

# examples per op: about 3-5 s per op on the CPU backends, fewer under the interpreters (Hypothesis' first
# example is the smallest one: empty inputs)
BUDGET = {"cpu": 6, "torch": 6, "onnxruntime": 4, "reference": 3, "triton": 3, "pallas": 2}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", available_backends())
def test_fuzz_finds_no_wrong_answer(backend, op, fuzz_examples):
    examples = fuzz_examples or BUDGET.get(backend, 2)
    results = fuzz.run_fuzz([backend], examples, ops=[op])
    assert len(results) == examples
    bad = [f"{r.status} [{r.dtype}] {r.case}: {r.detail}" for r in results if r.status in ("fail", "error")]
    assert not bad, "\n".join(bad)


def test_same_seed_same_examples_and_names_rebuild_them():
    seen = [[], []]
    for run in seen:
        fuzz.run_fuzz(["cpu"], 3, seed=5, ops=["paged_attention", "ssd"], progress=run.append)
    assert [r.case for r in seen[0]] == [r.case for r in seen[1]]
    assert len({r.case for r in seen[0]}) == 6
    other = fuzz.run_fuzz(["cpu"], 3, seed=6, ops=["paged_attention"])
    assert [r.case for r in other] != [r.case for r in seen[0][:3]]
    for r in seen[0]:
        case = fuzz.example(r.case)
        assert case.name == r.case
        again = run_case("cpu", case, r.dtype)
        assert (again.status, again.err, again.detail) == (r.status, r.err, r.detail)


@settings(max_examples=40, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_drawn_inputs_are_valid_and_poison_only_invisible_memory(data):
    """Every drawn case passes the ops' checks (the reference runs it), and the memory the runner poisons
    is invisible: other values there change no reference output."""
    op = data.draw(st.sampled_from(OPS))
    case = data.draw(fuzz.case_strategy(op))
    inputs = tensors.to_torch(case.make(np.random.default_rng(seed_of(case))), torch.float64, "cpu")
    masks = invisible.invisible(op, inputs)
    before = call(op, tensors.clone(inputs), "reference")
    after = call(op, {n: torch.where(masks[n], v + 7.0, v) if n in masks else v
                      for n, v in tensors.clone(inputs).items()}, "reference")
    for name, value in before.items():
        keep = ~masks[IN_PLACE[name]] if IN_PLACE.get(name) in masks else torch.ones_like(value, dtype=torch.bool)
        assert torch.equal(after[name][keep], value[keep]), (case.name, name)
