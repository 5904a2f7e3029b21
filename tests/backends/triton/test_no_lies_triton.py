"""The triton backend tells no lies, under Triton's interpreter on the CPU:
- every small tensor argument (cu_seqlens, seqused_k, sinks, block_table, indices, slot_mapping,
  state_indices, has_initial_state, A, dt_bias, D, bias, weight) given as a strided view of a larger
  buffer whose gaps hold garbage (huge or negative ints, an unlisted cache row, NaN) reads only the view;
  cache rows a call does not list stay bit-identical;
- memory no query can see (paged slots at or past seqused_k, unused and spare blocks, `-1` sparse
  slots, keys hidden by causality, a window or a block mask, state-cache rows not listed, listed -1 or
  with has_initial_state False) may hold NaN and Inf without changing any output;
- log-decays of -inf (a state reset) and -1e4 give the reference's finite results within the float32
  floor, in the sequence forms (several chunks, and the per-key-dim sub-chunk path) and the step forms.
Each result is compared with the float64 reference computed on clean, contiguous inputs.

Skipped unless the process was started with TRITON_INTERPRET=1:
    TRITON_INTERPRET=1 pytest -q tests/backends/triton/test_no_lies_triton.py
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.backends.triton.child import skip_unless_interpreting

skip_unless_interpreting()

import portable_attn as pa  # noqa: E402
from portable_attn.backends.triton import tuning  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.masks import BlockMask  # noqa: E402
from tests.backends.compare import assert_close, paged_cache  # noqa: E402

F32 = torch.float32
NAN, INF = float("nan"), float("inf")
HUGE = 1 << 30


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def gappy(x: torch.Tensor, gap) -> torch.Tensor:
    """x's values in a view of every other row of a buffer twice as long, `gap` in between."""
    buf = torch.full((2 * x.shape[0],) + tuple(x.shape[1:]), gap, dtype=x.dtype)
    buf[1::2] = x
    view = buf[1::2]
    assert not view.is_contiguous() or x.numel() <= 1
    return view


def clean(kw: dict, up: bool = True) -> dict:
    """Contiguous copies (float64 with `up`) of the tensors of kw, for the reference."""
    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        x = x.clone().contiguous()
        return x.double() if up and x.is_floating_point() and x.dtype != torch.bool else x
    return {n: one(x) for n, x in kw.items()}


def assert_floor(got, ref, what=""):
    """got within the float32 floor (2e-5 of the reference's magnitude) of ref, no NaN."""
    v = compare(got, ref, ref, F32)
    assert v.ok, f"{what}: {v.detail or f'err {v.err:.3g} > tol {v.tol:.3g}'}"


def with_chunk(monkeypatch, chunk):
    e = tuning.RECURRENT["interpret"]
    monkeypatch.setitem(tuning.RECURRENT, "interpret", dataclasses.replace(e, chunk=chunk))


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def attn_ref(op, args, kw):
    """The float64 reference's (o, lse) on clean copies (sinks stay float32, as the reference takes them)."""
    a, k = clean(dict(enumerate(args))), clean(kw)
    if "sinks" in kw:
        k["sinks"] = kw["sinks"].contiguous().clone()
    return getattr(pa, op)(*a.values(), **k, return_lse=True, backend="reference")


def attn_mine(op, args, kw):
    return getattr(pa, op)(*args, **kw, return_lse=True, backend="triton")


# ---- (1) strided small tensors: attention family ------------------------------------------------------

def test_attention_strided_cu_and_sinks():
    g = gen(1)
    lens_q, lens_k = [5, 0, 19], [9, 3, 21]
    q, k, v = rand(g, 24, 4, 16), rand(g, 33, 2, 16), rand(g, 33, 2, 16)
    sinks = rand(g, 4)
    kw = dict(cu_seqlens_q=gappy(cu(lens_q), HUGE), cu_seqlens_k=gappy(cu(lens_k), -7), causal=True,
              sinks=gappy(sinks, NAN))
    assert_close(attn_mine("attention", (q, k, v), kw), attn_ref("attention", (q, k, v), kw))


@pytest.mark.parametrize("path", ["flash", "split"])
def test_paged_strided_small_tensors(path):
    """Chunked prefill through the flash kernel (cu_seqlens_q), and split-KV decode: seqused_k, cu_seqlens_q,
    sinks and the block table's rows as strided views with garbage between."""
    g = gen(2)
    lens = [37, 70] if path == "split" else [12, 0, 30]
    kc, vc, table, used = paged_cache(g, lens, 5, 2, 16, 16)
    nq = [1] * len(lens) if path == "split" else [4, 0, 7]
    q = rand(g, sum(nq), 4, 16)
    kw = dict(sinks=gappy(rand(g, 4), NAN), window_size=(40, 0))
    if path == "flash":
        kw["cu_seqlens_q"] = gappy(cu(nq), -3)
    tab = torch.stack([table, torch.full_like(table, HUGE)], 1)[:, 0]  # rows strided, garbage rows between
    args = (q, kc, vc, tab, gappy(used, HUGE))
    assert_close(attn_mine("paged_attention", args, kw), attn_ref("paged_attention", args, kw))


def test_sparse_strided_small_tensors():
    g = gen(3)
    q, k, v = rand(g, 9, 4, 16), rand(g, 14, 2, 16), rand(g, 14, 2, 16)
    idx = torch.full((9, 2, 6), -1, dtype=torch.int32)
    for t in range(9):
        n = 6 if t < 4 else 8
        for h in range(2):
            idx[t, h, :4] = torch.randperm(n, generator=g)[:4].to(torch.int32)
    idx_view = torch.stack([idx, torch.full_like(idx, HUGE)], -1)[..., 0]   # topk strided
    kw = dict(cu_seqlens_q=gappy(cu([4, 5]), HUGE), cu_seqlens_k=gappy(cu([6, 8]), -9), sinks=gappy(rand(g, 4), NAN))
    args = (q, k, v, idx_view)
    assert_close(attn_mine("sparse_attention", args, kw), attn_ref("sparse_attention", args, kw))


def test_write_kv_cache_strided_slots():
    g = gen(4)
    k, v = rand(g, 5, 2, 8), rand(g, 5, 2, 8)
    kc, vc = rand(g, 3, 4, 2, 8), rand(g, 3, 4, 2, 8)
    slots = torch.tensor([7, -1, 0, 11, 2], dtype=torch.int32)
    rk, rv = kc.clone(), vc.clone()
    pa.write_kv_cache(k, v, kc, vc, gappy(slots, 5), backend="triton")
    pa.write_kv_cache(k, v, rk, rv, slots, backend="reference")
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


# ---- (1) strided small tensors: recurrent ops --------------------------------------------------------

LENS = [20, 0, 13]
UNLISTED = 0  # the gap value of state_indices: a real row the call does not list


def run_cache_op(op, kw, cache_name, listed):
    """op on triton (views as given, out poisoned) vs the reference on clean copies; the cache rows the call
    does not list stay bit-identical. Returns the triton output."""
    ref_kw = clean(kw)
    ref = getattr(pa, op)(**ref_kw, backend="reference")
    cache = kw[cache_name]
    before = cache.clone()
    ro = ref[0] if isinstance(ref, tuple) else ref
    out = torch.full(ro.shape, NAN)
    got = getattr(pa, op)(**kw, out=out, backend="triton")
    o = got[0] if isinstance(got, tuple) else got
    assert o is out
    assert_floor(o, ro, f"{op} out")
    rows = [r for r in listed if r >= 0]
    assert_floor(cache[rows], ref_kw[cache_name][rows], f"{op} {cache_name}")
    unlisted = sorted(set(range(cache.shape[0])) - set(rows))
    assert torch.equal(cache[unlisted].view(torch.int32), before[unlisted].view(torch.int32))
    return o


def seq_kw(op, g, t):
    if op == "linear_attention":
        return dict(q=rand(g, t, 2, 16), k=rand(g, t, 2, 16, scale=0.25), v=rand(g, t, 2, 16),
                    g=-rand(g, t, 2, 16, scale=0.3).abs()), (2, 16, 16)
    if op == "gated_delta_rule":
        return dict(q=rand(g, t, 2, 16), k=rand(g, t, 2, 16), v=rand(g, t, 2, 16), g=-rand(g, t, 2, scale=0.3).abs(),
                    beta=rand(g, t, 2).sigmoid(), use_qk_l2norm=True), (2, 16, 16)
    return dict(x=rand(g, t, 2, 16), dt=rand(g, t, 2, scale=0.5), A=gappy(-rand(g, 2).exp(), NAN),
                B=rand(g, t, 1, 16), C=rand(g, t, 1, 16), D=gappy(rand(g, 2, 16), NAN),
                dt_bias=gappy(rand(g, 2, scale=0.3), NAN), dt_softplus=True), (2, 16, 16)


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "ssd"])
def test_sequence_forms_strided_small_tensors(op):
    g = gen(5)
    kw, tail = seq_kw(op, g, sum(LENS))
    listed = torch.tensor([3, -1, 1], dtype=torch.int32)
    kw.update(cu_seqlens=gappy(cu(LENS), HUGE), initial_state=rand(g, 5, *tail),
              state_indices=gappy(listed, UNLISTED), has_initial_state=gappy(torch.tensor([True, True, False]), False))
    run_cache_op(op, kw, "initial_state", listed.tolist())


def step_kw(op, g, bsz):
    if op == "linear_attention_step":
        return dict(q=rand(g, bsz, 2, 16), k=rand(g, bsz, 2, 16, scale=0.25), v=rand(g, bsz, 2, 16),
                    g=-rand(g, bsz, 2).abs()), (2, 16, 16)
    if op == "gated_delta_rule_step":
        return dict(q=rand(g, bsz, 2, 16), k=rand(g, bsz, 2, 16), v=rand(g, bsz, 2, 16), g=-rand(g, bsz, 2, 16).abs(),
                    beta=rand(g, bsz, 2).sigmoid(), use_qk_l2norm=True), (2, 16, 16)
    return dict(x=rand(g, bsz, 2, 16), dt=rand(g, bsz, 2, scale=0.5), A=gappy(-rand(g, 2).exp(), NAN),
                B=rand(g, bsz, 1, 16), C=rand(g, bsz, 1, 16), D=gappy(rand(g, 2), NAN),
                dt_bias=gappy(rand(g, 2, scale=0.3), NAN), dt_softplus=True), (2, 16, 16)


@pytest.mark.parametrize("op", ["linear_attention_step", "gated_delta_rule_step", "ssd_step"])
def test_step_forms_strided_small_tensors(op):
    g = gen(6)
    kw, tail = step_kw(op, g, 3)
    listed = torch.tensor([2, -1, 4], dtype=torch.int32)
    kw.update(state=rand(g, 5, *tail), state_indices=gappy(listed, UNLISTED))
    run_cache_op(op, kw, "state", listed.tolist())


def test_conv_strided_small_tensors():
    g = gen(7)
    x = rand(g, sum(LENS), 6)
    weight = rand(g, 12, 4)[::2]                                            # rows strided
    listed = torch.tensor([3, 1, -1], dtype=torch.int32)
    kw = dict(x=x, weight=weight, bias=gappy(rand(g, 6), NAN), activation="silu", cu_seqlens=gappy(cu(LENS), HUGE),
              initial_state=rand(g, 5, 6, 3), state_indices=gappy(listed, UNLISTED),
              has_initial_state=gappy(torch.tensor([True, False, True]), False))
    run_cache_op("causal_conv1d", kw, "initial_state", listed.tolist())
    step = dict(x=rand(g, 3, 6), weight=weight, bias=gappy(rand(g, 6), NAN), state=rand(g, 5, 6, 3),
                state_indices=gappy(listed, UNLISTED))
    run_cache_op("causal_conv1d_step", step, "state", listed.tolist())


# ---- (2) what a query cannot see never reaches its output --------------------------------------------

@pytest.mark.parametrize("poison", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("path", ["flash", "split"])
def test_paged_invisible_slots_poisoned(path, poison):
    """Slots at or past seqused_k, the spare blocks and the table entries past a sequence's blocks hold
    poison: nothing changes."""
    g = gen(8)
    lens = [37, 70] if path == "split" else [12, 0, 30]
    bs = 5
    kc, vc, table, used = paged_cache(g, lens, bs, 2, 16, 16)
    nq = [1] * len(lens) if path == "split" else [4, 0, 7]
    q = rand(g, sum(nq), 4, 16)
    kw = {} if path == "split" else dict(cu_seqlens_q=cu(nq))
    ref = attn_ref("paged_attention", (q, kc, vc, table, used), kw)
    seen = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for s, n in enumerate(lens):
        j = torch.arange(n)
        seen[table[s, j // bs].long(), j % bs] = True
    pk, pv = kc.clone(), vc.clone()
    pk[~seen], pv[~seen] = poison, poison
    assert_close(attn_mine("paged_attention", (q, pk, pv, table, used), kw), ref)


def test_attention_hidden_keys_poisoned():
    """Keys hidden from some queries by causality (or a window, or a block mask) hold NaN / Inf in K and V:
    the queries that cannot see them are unchanged (queries that see them are not checked)."""
    g = gen(9)
    t = 40
    q, k, v = rand(g, t, 4, 16), rand(g, t, 2, 16), rand(g, t, 2, 16)
    bad = torch.tensor([23, 30, 31])
    pk, pv = k.clone(), v.clone()
    pk[bad], pv[bad] = NAN, INF
    pv[31, 1] = -INF
    bm = BlockMask.from_mask_mod(lambda s, h, p, j: (j % 8 != 7) | (p == j), t, (8, 8))
    for kw in (dict(causal=True), dict(window_size=(6, 2)), dict(block_mask=bm, causal=True)):
        ro, rlse = attn_ref("attention", (q, k, v), kw)
        o, lse = attn_mine("attention", (q, pk, pv), kw)
        p = torch.arange(t)
        vis = torch.ones(t, t, dtype=torch.bool)
        if kw.get("causal"):
            vis &= p[None, :] <= p[:, None]
        if "window_size" in kw:
            left, right = kw["window_size"]
            vis &= (p[None, :] >= p[:, None] - left) & (p[None, :] <= p[:, None] + right)
        if "block_mask" in kw:
            vis &= bm.visible(0, p, p).any(0)
        blind = ~vis[:, bad].any(1)                                      # queries that see no poisoned key
        assert int(blind.sum()) >= 10
        assert_close((o[blind], lse[:, blind]), (ro[blind], rlse[:, blind]))


def test_sparse_unlisted_keys_poisoned():
    """Keys no query lists, and the -1 slots' would-be rows, hold NaN: nothing changes."""
    g = gen(10)
    q, k, v = rand(g, 6, 2, 16), rand(g, 20, 1, 16), rand(g, 20, 1, 16)
    idx = torch.full((6, 1, 5), -1, dtype=torch.int32)
    for t in range(6):
        idx[t, 0, 1:4] = torch.randperm(12, generator=g)[:3].to(torch.int32)
    ref = attn_ref("sparse_attention", (q, k, v, idx), {})
    listed = torch.zeros(20, dtype=torch.bool)
    listed[idx[idx >= 0].long()] = True
    pk, pv = k.clone(), v.clone()
    pk[~listed], pv[~listed] = NAN, NAN
    assert_close(attn_mine("sparse_attention", (q, pk, pv, idx), {}), ref)


def poisoned_cache(g, slots, tail, listed, has=None):
    """(a cache whose rows not read hold NaN, the same cache with zeros there, for the reference)."""
    cache = rand(g, slots, *tail)
    unread = [r for r in range(slots) if r not in listed]
    unread += [r for r, h in zip(listed, has if has is not None else [True] * len(listed)) if r >= 0 and not h]
    cache[unread] = NAN
    return cache


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "ssd", "causal_conv1d"])
def test_sequence_forms_unread_rows_poisoned(op):
    """Rows not listed, and a listed row with has_initial_state False, hold NaN: outputs and the written rows
    are the reference's, the unlisted rows keep their bits."""
    g = gen(11)
    listed, has = [3, -1, 1], [True, True, False]
    if op == "causal_conv1d":
        kw, tail = dict(x=rand(g, sum(LENS), 6), weight=rand(g, 6, 4), bias=rand(g, 6)), (6, 3)
    else:
        kw, tail = seq_kw(op, g, sum(LENS))
    kw.update(cu_seqlens=cu(LENS), initial_state=poisoned_cache(g, 5, tail, listed, has),
              state_indices=torch.tensor(listed, dtype=torch.int32), has_initial_state=torch.tensor(has))
    run_cache_op(op, kw, "initial_state", listed)


@pytest.mark.parametrize("op", ["linear_attention_step", "gated_delta_rule_step", "ssd_step", "causal_conv1d_step"])
def test_step_forms_unread_rows_poisoned(op):
    g = gen(12)
    listed = [2, -1, 4]
    if op == "causal_conv1d_step":
        kw, tail = dict(x=rand(g, 3, 6), weight=rand(g, 6, 4), bias=rand(g, 6)), (6, 3)
    else:
        kw, tail = step_kw(op, g, 3)
    kw.update(state=poisoned_cache(g, 5, tail, listed), state_indices=torch.tensor(listed, dtype=torch.int32))
    run_cache_op(op, kw, "state", listed)


# ---- (3) g = -inf and strong decays ------------------------------------------------------------------

STRONG = [float("-inf"), -1e4]
TOKENS = [2, 17, 18, 33]  # inside a chunk, a chunk's first token, two in a row, past the sub-chunk boundary


def decays(g, shape, strong):
    x = -rand(g, *shape, scale=0.3).abs()
    x[TOKENS] = strong
    x[TOKENS[1], ..., 0] = -0.1  # per key dim (or head): a weak decay beside the strong ones
    return x


def run_seq(op, kw):
    """Sequence form with an initial state: output and final state within the float32 floor."""
    o, final = getattr(pa, op)(**kw, output_final_state=True, backend="triton")
    ro, rf = getattr(pa, op)(**clean(kw), output_final_state=True, backend="reference")
    assert_floor(o, ro, f"{op} out")
    assert_floor(final, rf, f"{op} final state")


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("strong", STRONG, ids=["-inf", "-1e4"])
@pytest.mark.parametrize("op,gate", [("linear_attention", "head"), ("linear_attention", "key"),
                                     ("gated_delta_rule", "head"), ("gated_delta_rule", "key")])
def test_strong_decays_sequence(monkeypatch, op, gate, strong, chunk):
    with_chunk(monkeypatch, chunk)
    g = gen(13)
    t, h, kd, vd = 45, 2, 16, 16
    shape = (t, h) if gate == "head" else (t, h, kd)
    kw = dict(q=rand(g, t, h, kd), k=rand(g, t, h, kd, scale=0.25), v=rand(g, t, h, vd), g=decays(g, shape, strong),
              initial_state=rand(g, 1, h, kd, vd))
    if op == "gated_delta_rule":
        kw.update(beta=rand(g, t, h).sigmoid(), use_qk_l2norm=True)
    run_seq(op, kw)


@pytest.mark.parametrize("case", ["A=-1e4", "dt=1e4"])
def test_strong_decays_ssd(monkeypatch, case):
    with_chunk(monkeypatch, 16)
    g = gen(14)
    t, h = 45, 2
    dt, A = rand(g, t, h).abs(), -rand(g, h).exp()
    if case == "A=-1e4":
        A[1] = -1e4
    else:
        dt[TOKENS] = 1e4
    run_seq("ssd", dict(x=rand(g, t, h, 8), dt=dt, A=A, B=rand(g, t, 1, 16), C=rand(g, t, 1, 16),
                        initial_state=rand(g, 1, h, 8, 16)))


@pytest.mark.parametrize("strong", STRONG, ids=["-inf", "-1e4"])
@pytest.mark.parametrize("op,gate", [("linear_attention_step", "head"), ("linear_attention_step", "key"),
                                     ("gated_delta_rule_step", "head"), ("gated_delta_rule_step", "key"),
                                     ("ssd_step", "A")])
def test_strong_decays_step(op, gate, strong):
    g = gen(15)
    kw, tail = step_kw(op, g, 3)
    if gate == "A":
        kw["A"] = torch.tensor([strong, -0.5])
    else:
        kw["g"] = -rand(g, 3, 2).abs() if gate == "head" else -rand(g, 3, 2, 16).abs()
        kw["g"][0] = strong
        kw["g"][2, 1] = strong
    listed = [2, 0, 4]
    kw.update(state=rand(g, 5, *tail), state_indices=torch.tensor(listed, dtype=torch.int32))
    run_cache_op(op, kw, "state", listed)
