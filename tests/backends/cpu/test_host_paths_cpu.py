"""The cpu backend's decode-sized paths, against the float64 reference on random inputs: attention of a
few queries in one kernel call on token-major views, paged decode and step forms through scratch
buffers kept across calls (shapes and dtypes changing between calls), step forms updating consecutive
float32 cache rows where they lie (strided caches included). NaN fills memory no result may read."""
from __future__ import annotations

import math

import pytest
import torch

import portable_attn as pa
from portable_attn.backends.cpu import workspace
from tests.backends.compare import assert_close, state_tail
from tests.backends.cpu.test_attention_cpu import kernel_calls  # noqa: F401 - fixture
from tests.backends.cpu.test_recurrent_cpu import STEPS, inputs, randn
from tests.backends.cpu.test_recurrent_cpu import assert_close as assert_close_states

NAN = math.nan


def nan_padded(x, lead: int = 1):
    """x as a view whose rows sit between NaN rows and whose heads sit between NaN heads (an odd layout
    with only the last axis contiguous, which the kernel needs)."""
    buf = torch.full((x.shape[0] * 2 + lead, x.shape[1] * 2 + 1, x.shape[2]), NAN, dtype=x.dtype)
    view = buf[lead::2][:x.shape[0], 1::2]
    view.copy_(x)
    return view


def reference(op, *args, **kw):
    up = [a.double() if a.is_floating_point() else a for a in args]
    return getattr(pa, op)(*up, **kw, backend="reference")


# ---- attention: a few queries, one kernel call ---------------------------------------------------

@pytest.mark.parametrize("lq,lk,causal", [(1, 37, True), (1, 37, False), (5, 23, True), (7, 4, True),
                                          (16, 40, True), (3, 9, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_queries_one_kernel_call(kernel_calls, lq, lk, causal, dtype, monkeypatch):  # noqa: F811
    """Decode (one query) and a few queries (speculative decode; the causal band bottom-right aligned,
    with more queries than keys too) on strided views with NaN between rows and heads: one kernel call,
    results and lse as the reference's; the NaN-filled out= written fully. The torch path: decode's
    compiled kernel is off (test_native_cpu.py covers it)."""
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = (nan_padded(torch.randn(n, h, 16, generator=g).to(dtype)) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    sinks = torch.randn(4, generator=g)
    out = torch.full((lq, 4, 16), NAN, dtype=dtype)
    o, lse = pa.attention(q, k, v, causal=causal, sinks=sinks, return_lse=True, out=out, backend="cpu")
    assert o is out and len(kernel_calls) == 1
    ro, rlse = reference("attention", q, k, v, causal=causal, sinks=sinks, return_lse=True)
    assert_close((o, lse), (ro, rlse), dtype)


def test_decode_query_without_lse():
    """One query, no out= and no lse wanted (none is stored): the result as the reference's."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(n, h, 32, generator=g) for n, h in ((1, 8), (50, 2), (50, 2)))
    o = pa.attention(q, k, v, causal=True, backend="cpu")
    assert_close_states(o, reference("attention", q, k, v, causal=True))


# ---- paged decode: buffers kept across calls -----------------------------------------------------

def paged_decode_case(g, lens, bs, hkv, d, dtype):
    """q, caches and table of a decode batch: each sequence's blocks in random cache blocks, NaN in every
    slot at or past its length and in every block no sequence uses."""
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + 2
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(lens), max(nblocks) + 1), int(perm[-1]), dtype=torch.int32)
    kc, vc = (torch.full((total, bs, hkv, d), NAN, dtype=dtype) for _ in range(2))
    used = 0
    for s, (n, nb) in enumerate(zip(lens, nblocks)):
        table[s, :nb] = perm[used:used + nb]
        used += nb
        for c in (kc, vc):
            rows = torch.full((nb * bs, hkv, d), NAN)
            rows[:n] = torch.randn(n, hkv, d, generator=g)
            c[table[s, :nb].long()] = rows.view(nb, bs, hkv, d).to(dtype)
    q = torch.randn(len(lens), 2 * hkv, d, generator=g).to(dtype)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32)


def test_paged_decode_buffers_across_shapes():
    """Decode calls of growing, shrinking and differently typed batches in turn (the kept buffers
    reused, grown and given a second dtype), each equal to the reference: nothing left in a buffer by an
    earlier call reaches a later one, and NaN past each sequence's length never does."""
    g = torch.Generator().manual_seed(8)
    plans = [([9, 16, 3], 4, torch.float32), ([40, 1, 0, 33, 17], 8, torch.float32), ([5, 2], 4, torch.float32),
             ([12, 30, 7], 8, torch.bfloat16), ([9, 16, 3], 4, torch.float32)]
    for lens, bs, dtype in plans:
        q, kc, vc, table, used = paged_decode_case(g, lens, bs, 2, 16, dtype)
        out = torch.full(q.shape, NAN, dtype=dtype)
        got = pa.paged_attention(q, kc, vc, table, used, return_lse=True, out=out, backend="cpu")
        assert got[0] is out
        assert_close(got, reference("paged_attention", q, kc, vc, table, used, return_lse=True), dtype)


def test_workspace_buffers_are_bounded_and_per_dtype():
    """A kept buffer serves smaller requests as views of itself, a different dtype gets its own, and a
    request over KEEP_BYTES gets a fresh tensor that is not kept."""
    small = workspace.buffer("test.a", (3, 4), torch.float32)
    again = workspace.buffer("test.a", (2, 5), torch.float32)
    assert again.data_ptr() == small.data_ptr() and again.shape == (2, 5) and again.is_contiguous()
    assert workspace.buffer("test.a", (3, 4), torch.bfloat16).data_ptr() != small.data_ptr()
    n = workspace.KEEP_BYTES // 4 + 1
    big = workspace.buffer("test.a", (n,), torch.float32)
    assert big.data_ptr() != workspace.buffer("test.a", (n,), torch.float32).data_ptr()
    kept = workspace._kept()
    assert sum(b.numel() * b.element_size() for b in kept.values()) <= workspace.KEEP_BYTES


def test_buffers_made_in_inference_mode_serve_later_calls():
    """A dense attention call (kept head-major copies) inside torch.inference_mode(), then the same outside it: the
    buffers it kept are written again (an inference tensor kept there could not be)."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(40, 2, 16, generator=g) for _ in range(3))
    with torch.inference_mode():
        inside = pa.attention(q, k, v, causal=True, backend="cpu")
    outside = pa.attention(q, k, v, causal=True, backend="cpu")
    assert torch.equal(inside, outside)


# ---- step forms: rows in place, buffers across calls ------------------------------------------------

@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("first", [None, 3])
def test_step_consecutive_rows_in_place(step, first):
    """Consecutive rows of a float32 cache (state_indices None: rows 0..bsz-1, or 3..3+bsz-1) that is a
    strided view: updated where they lie, equal to the reference; NaN in the other rows and in the rest
    of the buffer around the view stays bit for bit."""
    g = torch.Generator().manual_seed(9)
    bsz, slots = 4, 9
    a = inputs(STEPS[step], g, bsz, gate="key" if step != "ssd_step" else "head")
    buf = randn(g, slots, *state_tail(STEPS[step], a), 2, scale=0.5)
    state = buf[..., 0]
    rows = list(range(first or 0, (first or 0) + bsz))
    others = [r for r in range(slots) if r not in rows]
    state[others] = NAN
    buf[..., 1] = NAN
    idx = None if first is None else torch.tensor(rows, dtype=torch.int32)
    cache = state.clone().nan_to_num_(0.0).double()
    out = torch.full(a["v" if "v" in a else "x"].shape, NAN)
    got = getattr(pa, step)(**a, state=state, state_indices=idx, out=out, backend="cpu")
    ref = {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in a.items()}
    want = getattr(pa, step)(**ref, state=cache, state_indices=idx, backend="reference")
    assert got is out
    assert_close_states(got, want)
    assert_close_states(state[rows], cache[rows])
    assert state[others].isnan().all() and buf[..., 1].isnan().all()


@pytest.mark.parametrize("step", STEPS)
def test_step_buffers_across_shapes(step):
    """Gathered rows (permuted, with -1) through the kept scratch buffers, in calls of different batch
    sizes and cache dtypes in turn: each equal to the reference, unlisted rows untouched."""
    g = torch.Generator().manual_seed(10)
    for bsz, dtype in [(5, torch.float32), (11, torch.float32), (3, torch.bfloat16), (5, torch.float32)]:
        a = inputs(STEPS[step], g, bsz, dtype=dtype)
        slots = bsz + 4
        state = randn(g, slots, *state_tail(STEPS[step], a), scale=0.5, dtype=dtype)
        rows = torch.randperm(slots, generator=g)[:bsz].to(torch.int32)
        rows[1] = -1
        unlisted = sorted(set(range(slots)) - set(rows.tolist()))
        state[unlisted] = NAN
        cache = state.double().nan_to_num(0.0)
        got = getattr(pa, step)(**a, state=state, state_indices=rows, backend="cpu")
        ref = {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in a.items()}
        want = getattr(pa, step)(**ref, state=cache, state_indices=rows, backend="reference")
        assert_close_states(got, want, dtype)
        listed = rows[rows >= 0].long()
        assert_close_states(state[listed], cache[listed], dtype)
        assert state[unlisted].isnan().all()
