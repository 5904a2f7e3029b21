"""The cpu backend's compiled recurrences (recurrent.cpp): the gated delta rule, linear attention and SSD, sequence and
step forms: strided views with NaN around them, only the state rows listed updated, nothing else written. (Their
conformance cases with and without the kernels: test_native_cpu.py.)"""
import math

import pytest
import torch

import portable_attn as pa
from tests.backends.cpu.test_native_cpu import spy_on


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


def nan_around(buf: torch.Tensor) -> bool:
    """Whether every element of an in_nan buffer outside its view is still NaN."""
    around = torch.ones_like(buf, dtype=torch.bool)
    around[1::2, 1::2] = False
    return bool(buf[around].isnan().all())


def _inputs(n, h, hv, kd, vd, dtype, per_key, gen):
    """q, k, v, g, beta of n rows, and their views between NaN (q, k every other element) with the buffers."""
    q, k = (torch.randn(n, h, kd, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(n, hv, vd, generator=gen).to(dtype)
    g = -torch.rand((n, hv, kd) if per_key else (n, hv, 1), generator=gen)
    beta = torch.rand(n, hv, 1, generator=gen)
    (qv, qb), (kv, kb) = (in_nan(x, every_other=True) for x in (q, k))
    (vv, vb), (gv, gb), (bv, bb) = (in_nan(x, every_other=False) for x in (v, g, beta))
    plain = (q, k, v, g if per_key else g[..., 0], beta[..., 0])
    return plain, (qv, kv, vv, gv if per_key else gv[..., 0], bv[..., 0]), (qb, kb, vb, gb, bb)


def _reference(op, plain, **kwargs):
    return getattr(pa, op)(*(x.double() for x in plain), use_qk_l2norm=True, backend="reference", **kwargs)


def tol(dtype, scale: float = 1.0):
    """Tolerances of a float32 or 16-bit result whose values reach about `scale` (sums of many products cancel)."""
    atol = (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    return dict(rtol=1e-5, atol=atol) if dtype == torch.float32 else dict(rtol=2e-2, atol=atol)


# H, Hv, K, V: GQA, lengths off the vector width, K past 128 (the sequence form's narrower column blocks)
SHAPES = [(2, 4, 20, 24), (4, 4, 128, 128), (1, 2, 16, 40), (1, 1, 160, 20)]


@pytest.mark.parametrize("h,hv,kd,vd", SHAPES)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("per_key", [False, True])
def test_step_matches_reference(monkeypatch, h, hv, kd, vd, dtype, state_dtype, per_key):
    """Strided inputs with NaN around them, a NaN-filled out=, a state cache between NaN rows, rows out of order with
    a -1: out and the listed rows as the reference's, every other byte of every buffer as it was."""
    calls = spy_on(monkeypatch, "delta_step")
    gen = torch.Generator().manual_seed(h * kd + vd + per_key)
    plain, views, bufs = _inputs(3, h, hv, kd, vd, dtype, per_key, gen)
    state = torch.randn(5, hv, kd, vd, generator=gen).to(state_dtype)
    rows = torch.tensor([3, -1, 0], dtype=torch.int32)
    sv, sb = in_nan(state, every_other=False)
    out, ob = in_nan(torch.full((3, hv, vd), math.nan, dtype=dtype), every_other=False)
    before = [b.clone() for b in bufs]
    got = pa.gated_delta_rule_step(*views, state=sv, state_indices=rows, use_qk_l2norm=True, out=out, backend="cpu")
    assert got is out and len(calls) == 1
    ref_state = state.double()
    ref = _reference("gated_delta_rule_step", plain, state=ref_state, state_indices=rows)
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(sv.double(), ref_state.to(state_dtype).double(), **tol(dtype))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))  # inputs untouched, NaN included
    assert torch.equal(bits(sv[[1, 2, 4]]), bits(state[[1, 2, 4]]))
    assert nan_around(sb) and nan_around(ob)


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
    plain, views, bufs = _inputs(45, h, hv, kd, vd, dtype, per_key, gen)
    cache = torch.randn(6, hv, kd, vd, generator=gen).to(state_dtype)
    rows, has = torch.tensor([4, 0, 2, 5], dtype=torch.int32), torch.tensor([True, True, False, True])
    out, ob = in_nan(torch.full((45, hv, vd), math.nan, dtype=dtype), every_other=False)
    before, cache_before = [b.clone() for b in bufs], cache.clone()
    got, final = pa.gated_delta_rule(*views, initial_state=cache, state_indices=rows, has_initial_state=has,
                                     cu_seqlens=cu, use_qk_l2norm=True, out=out, backend="cpu")
    assert got is out and final is None and len(calls) == 1
    ref_cache = cache_before.double()
    ref, _ = _reference("gated_delta_rule", plain, initial_state=ref_cache, state_indices=rows, has_initial_state=has,
                        cu_seqlens=cu)
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(cache.double(), ref_cache.to(state_dtype).double(), **tol(dtype))
    assert torch.equal(bits(cache[[1, 3]]), bits(cache_before[[1, 3]]))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))
    assert nan_around(ob)


@pytest.mark.parametrize("heads,p,n,groups", [(4, 16, 40, 2), (3, 64, 128, 1)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("gated", [False, True])
def test_ssd_step_matches_reference(monkeypatch, heads, p, n, groups, dtype, state_dtype, gated):
    """The SSD step on strided inputs between NaN (x every other element), D per head or per head and channel, z and
    dt_bias, softplus and limits, a state cache between NaN rows, rows out of order with a -1: out and the listed rows
    as the reference's, the other rows and every NaN untouched."""
    calls = spy_on(monkeypatch, "ssd_step")
    gen = torch.Generator().manual_seed(heads * p + n + gated)
    bsz = 3
    x = torch.randn(bsz, heads, p, generator=gen).to(dtype)
    dt = torch.randn(bsz, heads, 1, generator=gen)
    b_, c_ = (torch.randn(bsz, groups, n, generator=gen).to(dtype) for _ in range(2))
    z = torch.randn(bsz, heads, p, generator=gen).to(dtype)
    A, bias = -torch.rand(heads, generator=gen), torch.randn(heads, generator=gen)
    D = torch.randn(heads, p, generator=gen) if gated else torch.randn(heads, generator=gen)
    state = torch.randn(5, heads, p, n, generator=gen).to(state_dtype)
    rows = torch.tensor([3, -1, 0], dtype=torch.int32)
    (xv, xb), (dv, db), (bv, bb), (cv, cb), (zv, zb) = (in_nan(t, every_other=t is x) for t in (x, dt, b_, c_, z))
    sv, sb = in_nan(state, every_other=False)
    out, ob = in_nan(torch.full((bsz, heads, p), math.nan, dtype=dtype), every_other=False)
    bufs = (xb, db, bb, cb, zb)
    before = [b.clone() for b in bufs]
    kwargs = dict(D=D, dt_bias=bias, dt_softplus=True, dt_limit=(0.05, 1.5), state_indices=rows)
    got = pa.ssd_step(xv, dv[..., 0], A, bv, cv, state=sv, z=zv if gated else None, out=out, backend="cpu", **kwargs)
    assert got is out and len(calls) == 1
    ref_state = state.double()
    ref = pa.ssd_step(x.double(), dt[..., 0].double(), A.double(), b_.double(), c_.double(), state=ref_state,
                      z=z.double() if gated else None, backend="reference",
                      **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                         for k, v in kwargs.items()})
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(sv.double(), ref_state.to(state_dtype).double(), **tol(dtype))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))
    assert torch.equal(bits(sv[[1, 2, 4]]), bits(state[[1, 2, 4]]))
    assert nan_around(sb) and nan_around(ob)


GATES = [None, "head", "key"]  # linear attention without decay, with a decay per head (RetNet), per key dim (GLA)


def _linear_inputs(n, kd, vd, dtype, gate, gen):
    """q, k, v and g (or None) of n rows for 3 heads, their views between NaN (q, k every other element) and buffers."""
    plain, views, bufs = _inputs(n, 3, 3, kd, vd, dtype, gate == "key", gen)
    g = None if gate is None else plain[3]
    gv = None if gate is None else views[3]
    return (*plain[:3], g), (*views[:3], gv), bufs[:3] + (() if gate is None else bufs[3:4])


@pytest.mark.parametrize("kd,vd", [(20, 24), (128, 128)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("gate", GATES)
def test_linear_step_matches_reference(monkeypatch, kd, vd, dtype, state_dtype, gate):
    """linear_attention_step in the delta kernel without its delta term: strided inputs between NaN, a NaN-filled
    out=, a state cache between NaN rows, rows out of order with a -1: out and the listed rows as the reference's,
    every other byte as it was."""
    calls = spy_on(monkeypatch, "delta_step")
    gen = torch.Generator().manual_seed(kd + vd + GATES.index(gate))
    (q, k, v, g), (qv, kv, vv, gv), bufs = _linear_inputs(3, kd, vd, dtype, gate, gen)
    state = torch.randn(5, 3, kd, vd, generator=gen).to(state_dtype)
    rows = torch.tensor([3, -1, 0], dtype=torch.int32)
    sv, sb = in_nan(state, every_other=False)
    out, ob = in_nan(torch.full((3, 3, vd), math.nan, dtype=dtype), every_other=False)
    before = [b.clone() for b in bufs]
    got = pa.linear_attention_step(qv, kv, vv, g=gv, state=sv, state_indices=rows, out=out, backend="cpu")
    assert got is out and len(calls) == 1
    ref_state = state.double()
    ref = pa.linear_attention_step(q.double(), k.double(), v.double(), g=None if g is None else g.double(),
                                   state=ref_state, state_indices=rows, backend="reference")
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(sv.double(), ref_state.to(state_dtype).double(), **tol(dtype))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))
    assert torch.equal(bits(sv[[1, 2, 4]]), bits(state[[1, 2, 4]]))
    assert nan_around(sb) and nan_around(ob)


@pytest.mark.parametrize("kd,vd", [(20, 24), (128, 128)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("gate", GATES)
def test_linear_sequences_match_reference(monkeypatch, kd, vd, dtype, state_dtype, gate):
    """linear_attention over packed sequences (one empty, one of a token) in the delta kernel without its delta term,
    NaN around every input and a NaN-filled out=, initial states from a cache (rows out of order, one not read): out
    and the cache's rows as the reference's, its other rows and every NaN untouched."""
    calls = spy_on(monkeypatch, "delta_seq")
    gen = torch.Generator().manual_seed(kd + vd + GATES.index(gate))
    cu = torch.tensor([0, 1, 1, 30, 45], dtype=torch.int32)
    (q, k, v, g), (qv, kv, vv, gv), bufs = _linear_inputs(45, kd, vd, dtype, gate, gen)
    cache = torch.randn(6, 3, kd, vd, generator=gen).to(state_dtype)
    rows, has = torch.tensor([4, 0, 2, 5], dtype=torch.int32), torch.tensor([True, True, False, True])
    out, ob = in_nan(torch.full((45, 3, vd), math.nan, dtype=dtype), every_other=False)
    before, cache_before = [b.clone() for b in bufs], cache.clone()
    got, final = pa.linear_attention(qv, kv, vv, g=gv, initial_state=cache, state_indices=rows, has_initial_state=has,
                                     cu_seqlens=cu, out=out, backend="cpu")
    assert got is out and final is None and len(calls) == 1
    ref_cache = cache_before.double()
    ref, _ = pa.linear_attention(q.double(), k.double(), v.double(), g=None if g is None else g.double(),
                                 initial_state=ref_cache, state_indices=rows, has_initial_state=has, cu_seqlens=cu,
                                 backend="reference")
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(cache.double(), ref_cache.to(state_dtype).double(), **tol(dtype))
    assert torch.equal(bits(cache[[1, 3]]), bits(cache_before[[1, 3]]))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))
    assert nan_around(ob)


def _ssd_inputs(n, heads, p, nd, groups, dtype, gen):
    """x, dt, B, C, z of n rows and their views between NaN (x every other element) with the buffers."""
    x = torch.randn(n, heads, p, generator=gen).to(dtype)
    dt = torch.randn(n, heads, 1, generator=gen)
    b_, c_ = (torch.randn(n, groups, nd, generator=gen).to(dtype) for _ in range(2))
    z = torch.randn(n, heads, p, generator=gen).to(dtype)
    views, bufs = zip(*(in_nan(t, every_other=t is x) for t in (x, dt, b_, c_, z)))
    return (x, dt[..., 0], b_, c_, z), (views[0], views[1][..., 0], *views[2:]), bufs


@pytest.mark.parametrize("heads,p,n,groups", [(4, 16, 40, 2), (3, 64, 128, 1), (2, 24, 160, 1)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("gated", [False, True])
def test_ssd_sequences_match_reference(monkeypatch, heads, p, n, groups, dtype, state_dtype, gated):
    """SSD over packed sequences (one empty, one of a token) in the sequence kernel: strided inputs between NaN, D per
    head or per head and channel, z and dt_bias, softplus and limits, a NaN-filled out=, initial states from a cache
    (rows out of order, one not read): out and the cache's rows as the reference's, its other rows and every NaN
    untouched."""
    calls = spy_on(monkeypatch, "ssd_seq")
    gen = torch.Generator().manual_seed(heads * p + n + gated)
    cu = torch.tensor([0, 1, 1, 30, 45], dtype=torch.int32)
    (x, dt, b_, c_, z), (xv, dv, bv, cv, zv), bufs = _ssd_inputs(45, heads, p, n, groups, dtype, gen)
    A, bias = -torch.rand(heads, generator=gen), torch.randn(heads, generator=gen)
    D = torch.randn(heads, p, generator=gen) if gated else torch.randn(heads, generator=gen)
    cache = torch.randn(6, heads, p, n, generator=gen).to(state_dtype)
    rows, has = torch.tensor([4, 0, 2, 5], dtype=torch.int32), torch.tensor([True, True, False, True])
    out, ob = in_nan(torch.full((45, heads, p), math.nan, dtype=dtype), every_other=False)
    before, cache_before = [b.clone() for b in bufs], cache.clone()
    kwargs = dict(D=D, dt_bias=bias, dt_softplus=True, dt_limit=(0.05, 1.5), state_indices=rows,
                  has_initial_state=has, cu_seqlens=cu)
    got, final = pa.ssd(xv, dv, A, bv, cv, initial_state=cache, z=zv if gated else None, out=out, backend="cpu",
                        **kwargs)
    assert got is out and final is None and len(calls) == 1
    ref_cache = cache_before.double()
    ref, _ = pa.ssd(x.double(), dt.double(), A.double(), b_.double(), c_.double(), initial_state=ref_cache,
                    z=z.double() if gated else None, backend="reference",
                    **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()})
    torch.testing.assert_close(got.double(), ref, **tol(dtype, float(ref.abs().max())))
    torch.testing.assert_close(cache.double(), ref_cache.to(state_dtype).double(), **tol(dtype))
    assert torch.equal(bits(cache[[1, 3]]), bits(cache_before[[1, 3]]))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))
    assert nan_around(ob)


DECAYS = {  # log-decays per token and head of a 300-token sequence: the state's scale kept apart, and applied
    "weak": lambda t: torch.full(t, -1e-3),                        # never leaves [1e-18, 1e18] over the sequence
    "strong": lambda t: torch.full(t, -2.5),                       # leaves it every 17 tokens, mid time block
    "mixed": lambda t: torch.where(torch.rand(t) < 0.1, -30.0, -0.05),
    "growing": lambda t: torch.where(torch.arange(t[0])[:, None] < 100, 0.5, -0.5).expand(t),  # upward at 83
    "to zero": lambda t: torch.where(torch.arange(t[0])[:, None] % 37 == 5, -torch.inf, -0.3).expand(t),
}


@pytest.mark.parametrize("decay", list(DECAYS))
def test_sequence_decay_scales(monkeypatch, decay):
    """The sequence kernel holds the state as S / c (c the decays' product since a pass last applied it): weak, strong,
    growing and zero decays, and the final state, as the reference's."""
    calls = spy_on(monkeypatch, "delta_seq")
    gen = torch.Generator().manual_seed(len(decay))
    torch.manual_seed(len(decay))
    q, k = (torch.randn(300, 2, 32, generator=gen) for _ in range(2))
    v = 0.1 * torch.randn(300, 2, 48, generator=gen)
    beta, g = torch.rand(300, 2, generator=gen), DECAYS[decay]((300, 2)).contiguous()
    s0 = torch.randn(1, 2, 32, 48, generator=gen)
    got, final = pa.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True,
                                     backend="cpu")
    assert len(calls) == 1
    ref, ref_final = _reference("gated_delta_rule", (q, k, v, g, beta), initial_state=s0.double(),
                                output_final_state=True)
    torch.testing.assert_close(got.double(), ref, **tol(torch.float32, float(ref.abs().max())))
    torch.testing.assert_close(final.double(), ref_final, **tol(torch.float32, float(ref_final.abs().max())))
