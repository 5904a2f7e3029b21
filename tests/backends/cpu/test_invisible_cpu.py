"""What a query cannot see never reaches its output (docs/spec.md): with NaN in every key and value row no
query of the call can see (cache slots at or past seqused_k, unused and other sequences' blocks, keys
outside every window or block mask, -1 sparse slots) and in every state-cache row a call does not read,
the cpu backend's results equal the float64 reference's on the same inputs without the NaN."""
from __future__ import annotations

import math

import pytest
import torch

import portable_attn as pa
from portable_attn.masks import BlockMask
from tests.backends.compare import assert_close, state_tail
from tests.backends.cpu.test_recurrent_cpu import cu_of, inputs, randn
from tests.backends.cpu.test_recurrent_cpu import assert_close as assert_close_states

NAN = math.nan
HQ, HKV, D = 4, 2, 16


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def seen(s, lq, lk, causal=False, window=(-1, -1), block_mask=None):
    """bool [HKV, lk]: the keys of sequence s that some query (positions lk - lq .. lk - 1) of a kv head sees."""
    p, j = torch.arange(lk - lq, lk), torch.arange(lk)
    diff = j[None, :] - p[:, None]
    vis = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        vis &= diff <= 0
    if window[0] >= 0:
        vis &= diff >= -window[0]
    if window[1] >= 0:
        vis &= diff <= window[1]
    vis = vis[None]
    if block_mask is not None:
        vis = vis & block_mask.visible(s, p, j)                      # [Hm, lq, lk]
    vis = vis.any(1)                                                 # [1|HQ, lk]
    return vis.view(HKV, HQ // HKV, lk).any(1) if vis.shape[0] == HQ else vis.expand(HKV, lk)


def poison(x, keep):
    """x [..., H, D] with NaN in the (row, head) entries where keep [..., H] is False."""
    return x.masked_fill(~keep[..., None], NAN)


def call(op, clean, dirty, dtype=torch.float32, **kw):
    """The cpu backend on `dirty` (into a NaN-filled out) against the float64 reference on `clean`."""
    out = torch.full((dirty[0].shape[0], HQ, D), NAN, dtype=dtype)
    mine = getattr(pa, op)(*dirty, **kw, out=out, return_lse=True, backend="cpu")
    assert mine[0] is out
    up = [a.double() if a.is_floating_point() else a for a in clean]
    return mine, getattr(pa, op)(*up, **kw, return_lse=True, backend="reference")


def block_mask(lens, kind):
    """Per-head block masks over sequences of up to max(lens) keys in blocks of 4: kind 1, random FULL and
    EMPTY blocks per sequence; kind 2, PARTIAL blocks whose keys j = kv head (mod 3) no query sees."""
    n = max(lens)
    if kind == 1:
        g = torch.Generator().manual_seed(n)
        nb = -(-n // 4)
        return BlockMask.from_layout(2 * torch.randint(0, 2, (len(lens), HQ, nb, nb), generator=g), (4, 4))
    return BlockMask.from_mask_mod(lambda s, h, p, j: (j % 3 != h // (HQ // HKV)) & ((p + 2 * j) % 5 != 0), n,
                                   (4, 4), num_heads=HQ)


# ---- paged_attention -----------------------------------------------------------------------------

LENS_K = [13, 0, 9, 21, 6]
LENS_Q = [3, 0, 9, 5, 8]   # the last sequence: more queries than keys (some at negative positions)
BS = 4


def paged_setup(g, dtype):
    """A cache in blocks of BS whose table shares sequence 0's first and last blocks with sequence 2 (a
    common prefix; a last block both fill to slot 0) and points unused entries at a spare block."""
    nblocks = [-(-n // BS) for n in LENS_K]
    total = sum(nblocks) + 2
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(LENS_K), max(nblocks) + 2), int(perm[-1]), dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblocks):
        table[s, :n] = perm[used:used + n]
        used += n
    table[2, [0, 2]] = table[0, [0, 3]]
    kc, vc = (rand(g, total, BS, HKV, D, dtype=dtype) for _ in range(2))
    return kc, vc, table, torch.tensor(LENS_K, dtype=torch.int32)


def paged_keep(table, lens_q, **kw):
    """bool [NB, BS, HKV]: the cache entries some query of the call sees."""
    keep = torch.zeros(int(table.max()) + 1, BS, HKV, dtype=torch.bool)
    for s, (lq, lk) in enumerate(zip(lens_q, LENS_K)):
        vis = seen(s, lq, lk, **kw)
        for j in range(lk):
            keep[table[s, j // BS], j % BS] |= vis[:, j]
    return keep


PAGED = [{}, {"window_size": (5, 0)}, {"window_size": (2, 0), "softcap": 3.0}, {"block": 1}, {"block": 2},
         {"causal": False, "window_size": (3, 2)}]


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("kw", PAGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_invisible_slots(decode, kw, dtype):
    """Slots past seqused_k (in a block another sequence shares too), the spare block unused entries
    point at, and keys before every window hold NaN."""
    g = torch.Generator().manual_seed(20)
    kc, vc, table, seqused = paged_setup(g, dtype)
    lens_q = [1] * len(LENS_K) if decode else LENS_Q
    kw = dict(kw)
    if "block" in kw:
        kw["block_mask"] = block_mask(LENS_K, kw.pop("block"))
    q = rand(g, sum(lens_q), HQ, D, dtype=dtype)
    vis = dict(causal=kw.get("causal", True), window=kw.get("window_size", (-1, -1)), block_mask=kw.get("block_mask"))
    keep = paged_keep(table, lens_q, **vis)
    assert not keep.all()
    cu = None if decode else cu_of(lens_q)
    mine, ref = call("paged_attention", (q, kc, vc, table, seqused), (q, poison(kc, keep), poison(vc, keep), table,
                                                                     seqused), dtype, cu_seqlens_q=cu, **kw)
    assert_close(mine, ref, dtype)


# ---- attention -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"causal": True, "window_size": (7, 0)}, {"window_size": (5, 3)},
                                {"window_size": (4, 1), "softcap": 2.0}, {"causal": True, "block": 1},
                                {"block": 2}, {"causal": True, "window_size": (6, 0), "block": 1}])
def test_attention_invisible_keys(kw):
    """Keys outside every query's window or block mask hold NaN, with tiles that span visible and
    invisible keys (whole blocks of a mask row kept, windows over several tiles)."""
    g = torch.Generator().manual_seed(21)
    lq, lk = [40, 70, 0, 9], [40, 45, 5, 30]
    kw = dict(kw)
    if "block" in kw:
        kw["block_mask"] = block_mask(lk, kw.pop("block"))
    cq, ck = cu_of(lq), cu_of(lk)
    q, k, v = rand(g, sum(lq), HQ, D), rand(g, sum(lk), HKV, D), rand(g, sum(lk), HKV, D)
    vis = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)), block_mask=kw.get("block_mask"))
    keep = torch.cat([seen(s, a, b, **vis).T for s, (a, b) in enumerate(zip(lq, lk))])  # [Nk, HKV]
    assert not keep.all()
    mine, ref = call("attention", (q, k, v), (q, poison(k, keep), poison(v, keep)), cu_seqlens_q=cq,
                     cu_seqlens_k=ck, **kw)
    assert_close(mine, ref)


# ---- sparse_attention ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reversed_indices", [False, True])
def test_sparse_unused_slots(dtype, reversed_indices):
    """-1 slots (whole rows of them, and every slot of a sequence with no keys) where each sequence's
    key 0 and unlisted keys hold NaN: a -1 slot read as key 0 (or the next sequence's) would show.
    `indices` also as a view with its axes stored in reverse order (gathers then come out strided)."""
    g = torch.Generator().manual_seed(22)
    lq, lk, topk = [6, 3, 7, 2], [20, 0, 25, 9], 8
    cq, ck = cu_of(lq), cu_of(lk)
    q = rand(g, sum(lq), HQ, D, dtype=dtype)
    k, v = rand(g, sum(lk), HKV, D, dtype=dtype), rand(g, sum(lk), HKV, D, dtype=dtype)
    idx = torch.full((sum(lq), HKV, topk), -1, dtype=torch.int32)
    keep = torch.zeros(sum(lk), HKV, dtype=torch.bool)
    for s in range(len(lq)):
        for t in range(int(cq[s]), int(cq[s + 1])):
            for h in range(HKV):
                n = int(torch.randint(0, min(topk, max(lk[s] - 1, 0)) + 1, (), generator=g)) if lk[s] > 1 else 0
                rows = torch.randperm(max(lk[s] - 1, 0), generator=g)[:n] + 1      # key 0 never listed
                slots = torch.randperm(topk, generator=g)[:n]
                idx[t, h, slots] = rows.to(torch.int32)
                keep[int(ck[s]) + rows, h] = True
    idx[0] = -1                                                         # a query that sees nothing
    if reversed_indices:
        idx = idx.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    sinks = rand(g, HQ)
    mine, ref = call("sparse_attention", (q, k, v, idx), (q, poison(k, keep), poison(v, keep), idx), dtype,
                     cu_seqlens_q=cq, cu_seqlens_k=ck, sinks=sinks)
    assert_close(mine, ref, dtype)


# ---- state caches --------------------------------------------------------------------------------

SEQ_OPS = ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d")


@pytest.mark.parametrize("op", SEQ_OPS)
def test_state_rows_not_read(op):
    """Cache rows the call does not list, the row a -1 would clamp to, and rows whose has_initial_state
    is False hold NaN: outputs and written rows match the reference from a clean cache; unlisted rows
    keep their bits."""
    g = torch.Generator().manual_seed(23)
    lens = [5, 70, 0, 9]
    a = inputs(op, g, sum(lens))
    cu = cu_of(lens)
    clean = randn(g, 8, *state_tail(op, a), scale=0.5)
    rows = torch.tensor([3, -1, 5, 6], dtype=torch.int32)
    has = torch.tensor([True, True, True, False])
    dirty = clean.clone()
    dirty[[0, 1, 2, 4, 6, 7]] = NAN                                     # row 0: where a -1 would clamp to
    out = torch.full(a["v" if "v" in a else "x"].shape, NAN, dtype=torch.float32)
    y, final = getattr(pa, op)(**a, initial_state=dirty, state_indices=rows, has_initial_state=has, cu_seqlens=cu,
                               output_final_state=True, out=out, backend="cpu")
    ref = {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in a.items()}
    cache = clean.double()
    want = getattr(pa, op)(**ref, initial_state=cache, state_indices=rows, has_initial_state=has, cu_seqlens=cu,
                           output_final_state=True, backend="reference")
    assert y is out and final is dirty
    assert_close_states(y, want[0])
    assert_close_states(dirty[[3, 5, 6]], cache[[3, 5, 6]])
    assert torch.isnan(dirty[[0, 1, 2, 4, 7]]).all()


STEPS = ("linear_attention_step", "gated_delta_rule_step", "ssd_step", "causal_conv1d_step")


@pytest.mark.parametrize("step", STEPS)
def test_step_state_rows_not_read(step):
    """Step forms: NaN in unlisted rows (row 0 among them, where a -1 would clamp to) changes nothing."""
    g = torch.Generator().manual_seed(24)
    a = inputs(step[:-5], g, 5)
    clean = randn(g, 9, *state_tail(step[:-5], a), scale=0.5)
    rows = torch.tensor([4, -1, 8, 2, -1], dtype=torch.int32)
    dirty = clean.clone()
    dirty[[0, 1, 3, 5, 6, 7]] = NAN
    out = torch.full(a["v" if "v" in a else "x"].shape, NAN, dtype=torch.float32)
    y = getattr(pa, step)(**a, state=dirty, state_indices=rows, out=out, backend="cpu")
    ref = {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in a.items()}
    cache = clean.double()
    want = getattr(pa, step)(**ref, state=cache, state_indices=rows, backend="reference")
    assert y is out
    assert_close_states(y, want)
    assert_close_states(dirty[[2, 4, 8]], cache[[2, 4, 8]])
    assert torch.isnan(dirty[[0, 1, 3, 5, 6, 7]]).all()
