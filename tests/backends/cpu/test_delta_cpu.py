"""The cpu backend's compiled gated delta rule (delta.cpp), sequence and step forms, and the torch paths they replace:
both pass the conformance cases; the kernels read strided views with NaN around them, update only the state rows
listed and write nothing else."""
import math

import pytest
import torch

import portable_attn as pa
from portable_attn.conformance import FULL, catalogue, run_case
from tests.backends.cpu.test_native_cpu import spy_on

CASES = catalogue(FULL, ["gated_delta_rule", "gated_delta_rule_step"])
KERNEL = {"gated_delta_rule": "delta_seq", "gated_delta_rule_step": "delta_step"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.name}" for c in CASES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_path_conforms(case, dtype, monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.name}" for c in CASES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cases_reach_kernels(case, dtype, monkeypatch):
    """The catalogue's cases with the kernels on (a step whose strided layout leaves a state's [K, V] non-contiguous
    takes the torch path; the others reach delta.cpp)."""
    calls = spy_on(monkeypatch, KERNEL[case.op])
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"
    assert calls or (case.layout and case.op == "gated_delta_rule_step")


def in_nan(x: torch.Tensor, every_other: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): x's values between NaN rows and NaN heads of a larger buffer; with `every_other` its last axis
    also every other element."""
    last = 2 * x.shape[-1] if every_other else x.shape[-1]
    buf = torch.full((2 * x.shape[0] + 1, 2 * x.shape[1] + 1, *x.shape[2:-1], last), math.nan, dtype=x.dtype)
    view = buf[1::2, 1::2]
    view = view[..., 1::2] if every_other else view
    view.copy_(x)
    return view, buf


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


SHAPES = [(2, 4, 20, 24), (4, 4, 128, 128), (1, 2, 16, 40)]  # H, Hv, K, V: GQA, lengths off the vector width


@pytest.mark.parametrize("h,hv,kd,vd", SHAPES)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("per_key", [False, True])
def test_step_matches_reference(monkeypatch, h, hv, kd, vd, dtype, state_dtype, per_key):
    """Strided inputs with NaN around them (q, k every other element), a NaN-filled out=, rows out of order with a
    -1: out and the listed rows as the reference's, every other byte of every buffer as it was."""
    calls = spy_on(monkeypatch, "delta_step")
    gen = torch.Generator().manual_seed(h * kd + vd + per_key)
    bsz, slots = 3, 5
    q, k = (torch.randn(bsz, h, kd, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(bsz, hv, vd, generator=gen).to(dtype)
    g = -torch.rand((bsz, hv, kd) if per_key else (bsz, hv, 1), generator=gen)
    beta = torch.rand(bsz, hv, 1, generator=gen)
    state = torch.randn(slots, hv, kd, vd, generator=gen).to(state_dtype)
    rows = torch.tensor([3, -1, 0], dtype=torch.int32)
    (qv, qb), (kv, kb) = (in_nan(x, every_other=True) for x in (q, k))
    (vv, vb), (gv, gb), (bv, bb) = (in_nan(x, every_other=False) for x in (v, g, beta))
    gv, bv = (gv if per_key else gv[..., 0]), bv[..., 0]
    sv, sb = in_nan(state, every_other=False)
    out, ob = in_nan(torch.full((bsz, hv, vd), math.nan, dtype=dtype), every_other=False)
    before = [b.clone() for b in (qb, kb, vb, gb, bb, sb)]
    got = pa.gated_delta_rule_step(qv, kv, vv, gv, bv, state=sv, state_indices=rows, use_qk_l2norm=True, out=out,
                                   backend="cpu")
    assert got is out and len(calls) == 1
    ref_state = state.double()
    ref = pa.gated_delta_rule_step(q.double(), k.double(), v.double(), (g if per_key else g[..., 0]).double(),
                                   beta[..., 0].double(), state=ref_state, state_indices=rows, use_qk_l2norm=True,
                                   backend="reference")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    torch.testing.assert_close(sv.double(), ref_state.to(state_dtype).double(), **tol)
    for buf, was in zip((qb, kb, vb, gb, bb), before):  # inputs untouched, NaN included
        assert torch.equal(bits(buf), bits(was))
    unlisted = [1, 2, 4]
    assert torch.equal(bits(sv[unlisted]), bits(state[unlisted]))
    around_state = torch.ones_like(sb, dtype=torch.bool)
    around_state[1::2, 1::2] = False
    assert sb[around_state].isnan().all()
    around_out = torch.ones_like(ob, dtype=torch.bool)
    around_out[1::2, 1::2] = False
    assert ob[around_out].isnan().all()


@pytest.mark.parametrize("h,hv,kd,vd", SHAPES)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("per_key", [False, True])
def test_sequences_match_reference(monkeypatch, h, hv, kd, vd, dtype, state_dtype, per_key):
    """Packed sequences (one empty, one of a token) with NaN around every input and a NaN-filled out=, initial states
    from a cache (rows out of order, one not read): out and the cache's rows as the reference's, its other rows and
    every NaN untouched."""
    calls = spy_on(monkeypatch, "delta_seq")
    gen = torch.Generator().manual_seed(h * kd + vd + per_key)
    cu = torch.tensor([0, 1, 1, 30, 45], dtype=torch.int32)
    n, slots = 45, 6
    q, k = (torch.randn(n, h, kd, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(n, hv, vd, generator=gen).to(dtype)
    g = -torch.rand((n, hv, kd) if per_key else (n, hv, 1), generator=gen)
    beta = torch.rand(n, hv, 1, generator=gen)
    cache = torch.randn(slots, hv, kd, vd, generator=gen).to(state_dtype)
    rows, has = torch.tensor([4, 0, 2, 5], dtype=torch.int32), torch.tensor([True, True, False, True])
    (qv, qb), (kv, kb) = (in_nan(x, every_other=True) for x in (q, k))
    (vv, vb), (gv, gb), (bv, bb) = (in_nan(x, every_other=False) for x in (v, g, beta))
    gv, bv = (gv if per_key else gv[..., 0]), bv[..., 0]
    out, ob = in_nan(torch.full((n, hv, vd), math.nan, dtype=dtype), every_other=False)
    before, cache_before = [b.clone() for b in (qb, kb, vb, gb, bb)], cache.clone()
    got, final = pa.gated_delta_rule(qv, kv, vv, gv, bv, initial_state=cache, state_indices=rows, has_initial_state=has,
                                     cu_seqlens=cu, use_qk_l2norm=True, out=out, backend="cpu")
    assert got is out and final is None and len(calls) == 1
    ref_cache = cache_before.double()
    ref, _ = pa.gated_delta_rule(q.double(), k.double(), v.double(), (g if per_key else g[..., 0]).double(),
                                 beta[..., 0].double(), initial_state=ref_cache, state_indices=rows,
                                 has_initial_state=has, cu_seqlens=cu, use_qk_l2norm=True, backend="reference")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    torch.testing.assert_close(cache.double(), ref_cache.to(state_dtype).double(), **tol)
    assert torch.equal(bits(cache[[1, 3]]), bits(cache_before[[1, 3]]))
    for buf, was in zip((qb, kb, vb, gb, bb), before):
        assert torch.equal(bits(buf), bits(was))
    around = torch.ones_like(ob, dtype=torch.bool)
    around[1::2, 1::2] = False
    assert ob[around].isnan().all()
