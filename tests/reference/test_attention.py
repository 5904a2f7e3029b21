"""The reference attention family against an independent brute force, closed forms and SPEC's invariants.

Calls go through `portable_attn.checks` (as the public ops do) and then straight to the reference
module, so these tests do not depend on the registry or on other backends.
"""
from __future__ import annotations

import importlib
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from portable_attn import checks, ops
from portable_attn.masks import BlockMask
from portable_attn.backends.reference import precision

from . import brute_attention as brute

ref = importlib.import_module("portable_attn.backends.reference.attention")
F64 = torch.float64
INF = math.inf
HYP = settings(max_examples=40, deadline=None)


# ---- helpers ----------------------------------------------------------------------------------

def call(op: str, *args, **kw):
    """Like `portable_attn.<op>(..., backend="reference")`: bind the public signature, check, run."""
    bound = inspect.signature(getattr(ops, op)).bind(*args, **kw)
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.pop("backend")
    return getattr(ref, op)(**getattr(checks, "check_" + op)(a))


def rand(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def cu(lens) -> torch.Tensor:
    return torch.tensor([0] + list(np.cumsum(lens, dtype=np.int64)), dtype=torch.int32)


def qkv(gen, lens_q, lens_k, hq=4, hkv=2, d=8, dv=None, dtype=F64):
    return (rand(gen, sum(lens_q), hq, d, dtype=dtype), rand(gen, sum(lens_k), hkv, d, dtype=dtype),
            rand(gen, sum(lens_k), hkv, dv or d, dtype=dtype))


def assert_matches(o, lse, want_o, want_lse, tol=1e-10):
    """o (float64) to `tol`; lse (float32 by SPEC) to float32 accuracy, -inf exactly where expected."""
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    np.testing.assert_allclose(o.double().numpy(), want_o, rtol=tol, atol=tol)
    assert lse.dtype == torch.float32
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), np.isneginf(want_lse))
    np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=2e-6, atol=2e-6)


def run_vs_brute(q, k, v, lens_q=None, lens_k=None, *, causal=False, window=(-1, -1), softcap=0.0, sinks=None,
                 scale=None, block_mask=None, mask_mod=None):
    cq = None if lens_q is None else cu(lens_q)
    ck = None if lens_k is None else cu(lens_k)
    o, lse = call("attention", q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal, window_size=window,
                  softcap=softcap, sinks=sinks, softmax_scale=scale, block_mask=block_mask, return_lse=True)
    want_o, want_lse = brute.attention(q, k, v, cu_q=cq, cu_k=ck, causal=causal, window=window, softcap=softcap,
                                       sinks=sinks, scale=scale, mask_mod=mask_mod)
    assert o.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    assert_matches(o, lse, want_o, want_lse)
    return o, lse


# ---- against the brute force ------------------------------------------------------------------

@pytest.mark.parametrize("lq,lk", [(9, 9), (1, 13), (5, 13), (13, 5), (0, 4), (4, 0), (1, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, 0), (0, 3), (2, 4), (0, 0), (50, 50), (4, -1), (-1, 2)])
def test_positions_causal_window(lq, lk, causal, window):
    gen = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = qkv(gen, [lq], [lk])
    run_vs_brute(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2)])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_gqa_softcap_sinks(hq, hkv, softcap, with_sinks, causal):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    # lengths 0 and 1, Lq < Lk (chunked prefill / decode), Lq > Lk, keys without queries and the reverse
    lens_q, lens_k = [3, 0, 1, 6, 0, 2, 5, 2], [3, 4, 1, 9, 0, 2, 3, 0]
    q, k, v = qkv(gen, lens_q, lens_k, hq=hq, hkv=hkv, d=6, dv=5)
    sinks = rand(gen, hq, dtype=torch.float32) if with_sinks else None
    run_vs_brute(3 * q, k, v, lens_q, lens_k, causal=causal, window=(3, 1), softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("d,dv", [(8, 3), (3, 8), (1, 1), (16, 16)])
@pytest.mark.parametrize("scale", [None, 0.0, 0.7, -1.3])
def test_head_dims_and_scale(d, dv, scale):
    gen = torch.Generator().manual_seed(d * 17 + dv)
    q, k, v = qkv(gen, [4, 7], [6, 7], d=d, dv=dv)
    run_vs_brute(q, k, v, [4, 7], [6, 7], causal=True, scale=scale)


def test_sinks_float32_with_float64_activations_and_negative_inf_sink():
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(gen, [5], [7])
    sinks = torch.tensor([0.5, -INF, 3.0, -2.0])
    run_vs_brute(q, k, v, causal=True, sinks=sinks)


# ---- block masks against the brute force with the same element predicate -------------------------

L = 23  # longest key count in the block-mask tests; not a multiple of any block size used


def _mask_cases():
    glob = {0, 9}
    docs = [0] * 5 + [1] * 9 + [2] * 2 + [3] * 7
    return {
        "mask_mod": (lambda: BlockMask.from_mask_mod(lambda s, h, p, j: ((p * 7 + j * 3) % 5 < 3) | (j == p),
                                                     L, (4, 3)),
                     lambda s, h, p, j: (p * 7 + j * 3) % 5 < 3 or j == p),
        "local_global": (lambda: BlockMask.local_global(L, 2, sorted(glob), (4, 4)),
                         lambda s, h, p, j: abs(p - j) <= 2 or p in glob or j in glob),
        "strided": (lambda: BlockMask.strided(L, 4, 3, (8, 5)),
                    lambda s, h, p, j: j <= p and (p - j < 3 or (p - j) % 4 == 0)),
        "chunked_local": (lambda: BlockMask.chunked_local(L, 6, (4, 4)),
                          lambda s, h, p, j: p // 6 == j // 6),
        "document": (lambda: BlockMask.document(docs, (3, 4)),
                     lambda s, h, p, j: docs[p] == docs[j]),
        "prefix_lm": (lambda: BlockMask.prefix_lm(L, 6, (5, 2)),
                      lambda s, h, p, j: j < 6 or j <= p),
    }


@pytest.mark.parametrize("kind", list(_mask_cases()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(L, L), (4, L), (1, L), (5, 11), (L, 19), (0, 7)])
def test_block_mask_constructors(kind, causal, lq, lk):
    make, pred = _mask_cases()[kind]
    gen = torch.Generator().manual_seed(lq + 31 * lk)
    q, k, v = qkv(gen, [lq], [lk])
    run_vs_brute(q, k, v, causal=causal, window=(-1, 6), block_mask=make(), mask_mod=pred)


def test_block_mask_more_queries_than_keys_negative_positions_see_nothing():
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(gen, [9], [4])
    bm = BlockMask.from_layout(torch.ones(1, 1, 3, 3, dtype=torch.bool), (4, 4))
    o, lse = run_vs_brute(q, k, v, block_mask=bm, mask_mod=lambda s, h, p, j: True)
    assert torch.isneginf(lse[:, :5]).all() and (o[:5] == 0).all() and torch.isfinite(lse[:, 5:]).all()


def test_block_mask_per_sequence_and_per_head_mask_mod():
    gen = torch.Generator().manual_seed(6)
    lens_q, lens_k, hq = [7, 1, 0, 12], [10, 12, 3, 12], 4

    def pred(s, h, p, j):
        return ((p - j + s + 2 * h) % 3 != 0) | (j == 0)
    bm = BlockMask.from_mask_mod(pred, 12, (4, 3), num_seqs=4, num_heads=hq)
    q, k, v = qkv(gen, lens_q, lens_k, hq=hq, hkv=2)
    run_vs_brute(q, k, v, lens_q, lens_k, causal=True, block_mask=bm, mask_mod=lambda *a: bool(pred(*a)))


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 4), (3, 4)])
def test_block_mask_from_layout_with_partial_blocks(shape):
    """A random 0/1/2 layout with random partial tiles; the brute force reads the raw arrays."""
    gen = torch.Generator().manual_seed(sum(shape))
    bq, bk, lmax = 4, 3, 14
    nqb, nkb = math.ceil(lmax / bq) + 1, math.ceil(lmax / bk)  # one query block more than needed
    lay = torch.randint(0, 3, shape + (nqb, nkb), generator=gen)
    tiles = torch.rand(5, bq, bk, generator=gen) < 0.5
    index = torch.where(lay == 1, torch.randint(0, 5, lay.shape, generator=gen), -1)
    bm = BlockMask.from_layout(lay.to(torch.int8), (bq, bk), index.to(torch.int32), tiles)
    lay_np, idx_np, tiles_np = lay.numpy(), index.numpy(), tiles.numpy()

    def pred(s, h, p, j):
        s, h = (s if shape[0] > 1 else 0), (h if shape[1] > 1 else 0)
        state = lay_np[s, h, p // bq, j // bk]
        return state == 2 or (state == 1 and bool(tiles_np[idx_np[s, h, p // bq, j // bk], p % bq, j % bk]))
    lens_q, lens_k = [14, 3, 1], [14, 10, 9]
    q, k, v = qkv(gen, lens_q, lens_k, hq=4, hkv=1)
    run_vs_brute(q, k, v, lens_q, lens_k, causal=False, block_mask=bm, mask_mod=pred)


# ---- closed forms on tiny cases -----------------------------------------------------------------

def test_single_key_gives_its_value():
    gen = torch.Generator().manual_seed(7)
    q, k, v = qkv(gen, [3], [1], hq=4, hkv=2, d=5, dv=3)
    o, lse = call("attention", q, k, v, softmax_scale=0.5, return_lse=True)
    for h in range(4):
        torch.testing.assert_close(o[:, h], v[0, h // 2].expand(3, 3), rtol=0, atol=1e-14)
        torch.testing.assert_close(lse[h].double(), 0.5 * (q[:, h] @ k[0, h // 2]), rtol=1e-6, atol=1e-6)


def test_equal_keys_average_visible_values():
    gen = torch.Generator().manual_seed(8)
    q, _, v = qkv(gen, [6], [6], hq=2, hkv=1, d=4, dv=3)
    k = rand(gen, 1, 1, 4).expand(6, 1, 4)  # every key the same (and a stride-0 input)
    o, lse = call("attention", q, k, v, causal=True, window_size=(2, 0), return_lse=True)
    for t in range(6):
        seen = v[max(0, t - 2):t + 1, 0]
        torch.testing.assert_close(o[t], seen.mean(0).expand(2, 3), rtol=0, atol=1e-14)
        s = (q[t] @ k[0, 0]) / 2.0
        torch.testing.assert_close(lse[:, t].double(), s + math.log(len(seen)), rtol=1e-6, atol=1e-6)


def test_zero_scale_is_uniform_over_visible_keys():
    gen = torch.Generator().manual_seed(9)
    q, k, v = qkv(gen, [4], [10], hq=1, hkv=1)
    o, lse = call("attention", q, k, v, causal=True, window_size=(3, -1), softmax_scale=0.0, return_lse=True)
    for t in range(4):
        p = t + 6
        torch.testing.assert_close(o[t, 0], v[p - 3:p + 1, 0].mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, torch.full((1, 4), math.log(4.0)))


def test_causal_zero_window_is_the_diagonal():
    gen = torch.Generator().manual_seed(10)
    q, k, v = qkv(gen, [7], [7])
    o = call("attention", q, k, v, causal=True, window_size=(0, 0))
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-14)


def test_sink_closed_form_and_minus_inf_sink_is_no_sink():
    gen = torch.Generator().manual_seed(11)
    q, k, v = qkv(gen, [3], [1], hq=2, hkv=1)
    sinks = torch.tensor([0.3, -1.7])
    o, lse = call("attention", q, k, v, sinks=sinks, return_lse=True)
    s = (q[:, :, :] @ k[0, 0]) / math.sqrt(8)  # [3, 2]
    z = torch.exp(s) + torch.exp(sinks.double())
    torch.testing.assert_close(o, (torch.exp(s) / z)[..., None] * v[0, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lse.double(), torch.log(z).T, rtol=1e-6, atol=1e-6)

    q, k, v = qkv(gen, [5], [8])
    o1, l1 = call("attention", q, k, v, causal=True, sinks=torch.full((4,), -INF), return_lse=True)
    o2, l2 = call("attention", q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-15)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_softcap_bounds_scores():
    gen = torch.Generator().manual_seed(12)
    q, k, v = qkv(gen, [2], [1], hq=1, hkv=1)
    q = 50 * q
    _, lse = call("attention", q, k, v, softcap=2.0, return_lse=True)
    s = (q[:, 0] @ k[0, 0]) / math.sqrt(8)
    torch.testing.assert_close(lse[0].double(), 2.0 * torch.tanh(s / 2.0), rtol=1e-6, atol=1e-6)
    assert (lse.abs() <= 2.0).all()


@pytest.mark.parametrize("with_sinks", [False, True])
def test_nothing_visible_gives_zero_and_minus_inf_never_nan(with_sinks):
    gen = torch.Generator().manual_seed(13)
    q, k, v = qkv(gen, [6, 2], [3, 0], hq=2, hkv=1)
    sinks = torch.tensor([0.25, -3.0]) if with_sinks else None
    # non-causal (0, 0) window: query t of sequence 0 (position t - 3) sees key t - 3 only if t >= 3
    o, lse = call("attention", q, k, v, cu_seqlens_q=cu([6, 2]), cu_seqlens_k=cu([3, 0]), window_size=(0, 0),
                  sinks=sinks, return_lse=True)
    blind = [0, 1, 2, 6, 7]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o[blind] == 0).all()
    want = sinks[:, None].expand(2, 5) if with_sinks else torch.full((2, 5), -INF)
    torch.testing.assert_close(lse[:, blind], want)
    if not with_sinks:  # the others see exactly one key
        torch.testing.assert_close(o[3:6], v[0:3].expand(3, 2, 8), rtol=0, atol=1e-14)


def test_lse_merges_split_keys():
    """Two halves of the keys merged through their lse == the whole (what split-KV kernels do)."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = qkv(gen, [5], [12])
    o, lse = call("attention", q, k, v, return_lse=True)
    o1, l1 = call("attention", q, k[:7], v[:7], return_lse=True)
    o2, l2 = call("attention", q, k[7:], v[7:], return_lse=True)
    l1, l2 = l1.double(), l2.double()
    m = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - m).T[..., None] + o2 * torch.exp(l2 - m).T[..., None]
    torch.testing.assert_close(merged, o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.float(), lse)


def test_sparse_single_index_and_empty_index_sets():
    gen = torch.Generator().manual_seed(15)
    q, k, v = qkv(gen, [4], [6], hq=4, hkv=2)
    idx = torch.tensor([[[5, -1], [0, -1]], [[-1, 2], [-1, -1]], [[-1, -1], [3, -1]], [[1, -1], [1, -1]]],
                       dtype=torch.int32)  # [Tq, Hkv, topk]
    o, lse = call("sparse_attention", q, k, v, idx, return_lse=True)
    for t in range(4):
        for h in range(4):
            listed = [int(x) for x in idx[t, h // 2] if x >= 0]
            if listed:
                torch.testing.assert_close(o[t, h], v[listed[0], h // 2], rtol=0, atol=1e-14)
            else:
                assert (o[t, h] == 0).all() and lse[h, t] == -INF


# ---- SPEC invariants on the reference ----------------------------------------------------------

def test_packed_varlen_equals_one_by_one():
    gen = torch.Generator().manual_seed(16)
    lens_q, lens_k = [4, 0, 1, 7, 3], [9, 2, 1, 7, 0]
    q, k, v = qkv(gen, lens_q, lens_k, hq=6, hkv=2, d=5, dv=7)
    sinks = rand(gen, 6, dtype=torch.float32)
    kw = dict(causal=True, window_size=(4, 1), softcap=3.0, sinks=sinks, return_lse=True)
    o, lse = call("attention", q, k, v, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), **kw)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for i in range(len(lens_q)):
        oi, li = call("attention", q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], **kw)
        torch.testing.assert_close(o[cq[i]:cq[i + 1]], oi, rtol=0, atol=1e-14)
        torch.testing.assert_close(lse[:, cq[i]:cq[i + 1]], li, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hkv", [1, 2, 3])
def test_gqa_equals_repeated_kv_heads(hkv):
    gen = torch.Generator().manual_seed(17)
    q, k, v = qkv(gen, [5, 8], [9, 8], hq=6, hkv=hkv)
    kw = dict(cu_seqlens_q=cu([5, 8]), cu_seqlens_k=cu([9, 8]), causal=True, window_size=(5, 0), return_lse=True)
    o, lse = call("attention", q, k, v, **kw)
    o2, lse2 = call("attention", q, k.repeat_interleave(6 // hkv, 1), v.repeat_interleave(6 // hkv, 1), **kw)
    torch.testing.assert_close(o, o2, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, lse2)


def _paged(gen, keys, values, lens, bs, extra_blocks=3):
    """A cache with the sequences scattered over shuffled blocks; returns k_cache, v_cache, block_table."""
    need = [math.ceil(n / bs) for n in lens]
    max_blocks = max(need + [0]) + 1
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=gen)
    kc = rand(gen, nb, bs, keys.shape[1], keys.shape[2])  # never-zero filler in unused slots
    vc = rand(gen, nb, bs, values.shape[1], values.shape[2])
    table = torch.randint(0, nb, (len(lens), max_blocks), generator=gen, dtype=torch.int32)  # junk past the end
    used, start = 0, 0
    for i, n in enumerate(lens):
        for b in range(need[i]):
            blk = int(perm[used])
            used += 1
            table[i, b] = blk
            rows = slice(start + b * bs, min(start + (b + 1) * bs, start + n))
            kc[blk, :rows.stop - rows.start] = keys[rows]
            vc[blk, :rows.stop - rows.start] = values[rows]
        start += n
    return kc, vc, table


@pytest.mark.parametrize("bs", [1, 3, 5, 16])
@pytest.mark.parametrize("decode", [True, False])
def test_paged_equals_attention_on_gathered_keys(bs, decode):
    gen = torch.Generator().manual_seed(bs)
    lens_k = [7, 1, 0, 16, 11]
    lens_q = [1, 1, 1, 1, 1] if decode else [3, 1, 0, 16, 5]  # decode: one query per sequence
    q, k, v = qkv(gen, lens_q, lens_k, hq=4, hkv=2, d=6, dv=4)
    kc, vc, table = _paged(gen, k, v, lens_k, bs)
    sinks = rand(gen, 4, dtype=torch.float32)
    kw = dict(causal=True, window_size=(6, 0), softcap=2.0, sinks=sinks, return_lse=True)
    o, lse = call("paged_attention", q, kc, vc, table, torch.tensor(lens_k, dtype=torch.int32),
                  cu_seqlens_q=None if decode else cu(lens_q), **kw)
    k2 = torch.cat([kc[table[i, j // bs], j % bs][None] for i, n in enumerate(lens_k) for j in range(n)])
    v2 = torch.cat([vc[table[i, j // bs], j % bs][None] for i, n in enumerate(lens_k) for j in range(n)])
    o2, lse2 = call("attention", q, k2, v2, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), **kw)
    torch.testing.assert_close(o, o2, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, lse2)
    want_o, want_lse = brute.paged_attention(q, kc, vc, table, lens_k, cu_q=cu(lens_q), causal=True, window=(6, 0),
                                             softcap=2.0, sinks=sinks)
    assert_matches(o, lse, want_o, want_lse)


def test_paged_with_block_mask():
    gen = torch.Generator().manual_seed(18)
    lens_q, lens_k = [2, 1], [13, 8]
    q, k, v = qkv(gen, lens_q, lens_k)
    kc, vc, table = _paged(gen, k, v, lens_k, 5)
    bm = BlockMask.chunked_local(13, 4, (4, 4))
    o = call("paged_attention", q, kc, vc, table, torch.tensor(lens_k, dtype=torch.int32), cu_seqlens_q=cu(lens_q),
             block_mask=bm)
    want, _ = brute.attention(q, k, v, cu_q=cu(lens_q), cu_k=cu(lens_k), causal=True,
                              mask_mod=lambda s, h, p, j: p // 4 == j // 4)
    np.testing.assert_allclose(o.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bs", [3, 16])
def test_write_kv_cache_then_paged_equals_attention(bs):
    gen = torch.Generator().manual_seed(19)
    hkv, d, nb = 2, 8, 9
    lens = [5, 0, 9]
    buf = rand(gen, nb, bs, 2, hkv, d)
    k_cache, v_cache = buf[:, :, 0], buf[:, :, 1]  # two non-contiguous views of one buffer
    before = buf.clone()
    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(3, math.ceil(9 / bs), dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(lens):
        for b in range(math.ceil(n / bs)):
            table[i, b] = int(perm[used])
            used += 1
        slots += [int(table[i, j // bs]) * bs + j % bs for j in range(n)]
    # interleave two padding tokens (-1) with the real ones
    k_new, v_new = rand(gen, sum(lens) + 2, hkv, d), rand(gen, sum(lens) + 2, hkv, d)
    slot_mapping = torch.tensor(slots[:3] + [-1] + slots[3:] + [-1])
    real = [t for t, s in enumerate(slot_mapping.tolist()) if s >= 0]
    assert call("write_kv_cache", k_new, v_new, k_cache, v_cache, slot_mapping) is None
    want_k, want_v = brute.write_kv_cache(k_new, v_new, before[:, :, 0], before[:, :, 1], slot_mapping)
    assert torch.equal(buf[:, :, 0], torch.from_numpy(want_k)) and torch.equal(buf[:, :, 1], torch.from_numpy(want_v))
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[torch.tensor(slots)] = True
    assert torch.equal(buf.reshape(nb * bs, -1)[~written], before.reshape(nb * bs, -1)[~written])  # untouched

    q = rand(gen, 3, 4, d)
    o = call("paged_attention", q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), causal=True)
    o2 = call("attention", q, k_new[real], v_new[real], cu_seqlens_q=cu([1, 1, 1]), cu_seqlens_k=cu(lens),
              causal=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=1e-14)


def test_block_mask_all_full_equals_no_mask_and_wide_window_equals_no_window():
    gen = torch.Generator().manual_seed(20)
    lens_q, lens_k = [6, 1, 9], [9, 5, 9]
    q, k, v = qkv(gen, lens_q, lens_k)
    kw = dict(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), causal=True, return_lse=True)
    o, lse = call("attention", q, k, v, **kw)
    full = BlockMask.from_layout(torch.ones(1, 1, 5, 3, dtype=torch.bool), (2, 4))  # larger than needed
    o2, lse2 = call("attention", q, k, v, block_mask=full, **kw)
    o3, lse3 = call("attention", q, k, v, window_size=(9, 100), **kw)
    for a, b in ((o2, o), (lse2, lse), (o3, o), (lse3, lse)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    o4 = call("attention", q, k, v, window_size=(7, 100), **kw)[0]  # one key too few: differs
    assert not torch.allclose(o4, o)


def test_mask_mod_block_sizes_agree():
    gen = torch.Generator().manual_seed(21)
    q, k, v = qkv(gen, [30], [37], hq=2, hkv=2)

    def pred(s, h, p, j):
        return ((p - j) % (3 + h) == 0) | ((p - j).abs() < 2)
    out = [call("attention", q, k, v, block_mask=BlockMask.from_mask_mod(pred, 37, bs, num_heads=2))
           for bs in ((16, 16), (1, 1), (16, 24))]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], out[1], rtol=0, atol=0)


def test_chunked_prefill_equals_the_tail_of_full_prefill():
    gen = torch.Generator().manual_seed(22)
    q, k, v = qkv(gen, [12], [12])
    sinks = rand(gen, 4, dtype=torch.float32)
    full = call("attention", q, k, v, causal=True, window_size=(5, 0), sinks=sinks)
    for start in (0, 7, 11):
        part = call("attention", q[start:], k, v, causal=True, window_size=(5, 0), sinks=sinks)
        torch.testing.assert_close(part, full[start:], rtol=0, atol=1e-14)


def test_sparse_with_causal_window_indices_equals_dense():
    gen = torch.Generator().manual_seed(23)
    lens = [7, 0, 9]
    q, k, v = qkv(gen, lens, lens, hq=4, hkv=2)
    rows = []
    for n in lens:
        for t in range(n):
            listed = list(range(max(0, t - 3), t + 1))[::-1]
            rows.append(listed + [-1] * (5 - len(listed)))
    idx = torch.tensor(rows, dtype=torch.int32).reshape(-1, 1, 5).expand(-1, 2, 5).contiguous()
    o, lse = call("sparse_attention", q, k, v, idx, cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), softcap=2.0,
                  return_lse=True)
    o2, lse2 = call("attention", q, k, v, cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), causal=True,
                    window_size=(3, 0), softcap=2.0, return_lse=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, lse2)


# ---- dtypes, out=, strides, empty inputs --------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-6),
                                       (torch.float64, 1e-12)])
def test_every_dtype(dtype, tol):
    gen = torch.Generator().manual_seed(24)
    q, k, v = qkv(gen, [5], [8], dtype=dtype)
    sinks = rand(gen, 4, dtype=torch.float32)
    o, lse = call("attention", q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    want_o, want_lse = brute.attention(q, k, v, causal=True, sinks=sinks)
    np.testing.assert_allclose(o.double().numpy(), want_o, rtol=tol, atol=tol)  # exact, then one rounding
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-6, atol=1e-6)


def test_out_prefilled_with_nan_is_fully_written_and_returned():
    gen = torch.Generator().manual_seed(25)
    lens_q, lens_k = [3, 0, 4], [5, 2, 0]  # the last sequence sees nothing
    q, k, v = qkv(gen, lens_q, lens_k, dv=3)
    out = torch.full((7, 4, 3), float("nan"), dtype=F64)
    res = call("attention", q, k, v, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), out=out, return_lse=True)
    assert res[0] is out and not torch.isnan(out).any()
    torch.testing.assert_close(out, call("attention", q, k, v, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k)))
    assert (out[3:] == 0).all()

    out = torch.full((7, 4, 3), float("nan"), dtype=F64)
    idx = torch.full((7, 2, 2), -1, dtype=torch.int32)
    idx[0, :, 0] = 1
    assert call("sparse_attention", q, k, v, idx, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), out=out) is out
    assert not torch.isnan(out).any() and (out[1:] == 0).all() and (out[0] != 0).all()

    kc, vc, table = _paged(gen, k[:5], v[:5], [5], 3)
    out = torch.full((1, 4, 3), float("nan"), dtype=F64)
    assert call("paged_attention", q[:1], kc, vc, table, torch.tensor([5], dtype=torch.int32), out=out) is out
    assert not torch.isnan(out).any()


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(26)
    q, k, v = qkv(gen, [6], [9], hq=4, hkv=2)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    kt = torch.cat([k, k], dim=2)[:, :, ::2]
    kt[:] = k
    vt = v.transpose(0, 2).contiguous().transpose(0, 2)
    assert not (qt.is_contiguous() or kt.is_contiguous() or vt.is_contiguous())
    torch.testing.assert_close(call("attention", qt, kt, vt, causal=True), call("attention", q, k, v, causal=True),
                               rtol=0, atol=0)


def test_empty_inputs():
    e = torch.zeros(0, 4, 8, dtype=F64)
    e_kv = torch.zeros(0, 2, 8, dtype=F64)
    gen = torch.Generator().manual_seed(27)
    o, lse = call("attention", e, e_kv, e_kv, causal=True, return_lse=True)
    assert o.shape == (0, 4, 8) and lse.shape == (4, 0)
    z0 = torch.zeros(1, dtype=torch.int32)  # zero sequences
    assert call("attention", e, e_kv, e_kv, cu_seqlens_q=z0, cu_seqlens_k=z0).shape == (0, 4, 8)
    q, k, v = qkv(gen, [2], [5])
    o, lse = call("attention", q, e_kv, e_kv, return_lse=True)  # keys absent: nothing visible
    assert (o == 0).all() and torch.isneginf(lse).all()
    assert call("attention", e, k, v).shape == (0, 4, 8)
    assert call("sparse_attention", e, k, v, torch.zeros(0, 2, 3, dtype=torch.int32)).shape == (0, 4, 8)
    kc, vc = rand(gen, 2, 3, 2, 8), rand(gen, 2, 3, 2, 8)
    before = kc.clone()
    call("write_kv_cache", e_kv, e_kv, kc, vc, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(kc, before)
    o = call("paged_attention", e, kc, vc, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert o.shape == (0, 4, 8)
    o, lse = call("paged_attention", q[:1], kc, vc, torch.zeros(1, 2, dtype=torch.int32),
                  torch.zeros(1, dtype=torch.int32), return_lse=True)
    assert (o == 0).all() and torch.isneginf(lse).all()


def test_emulated_bf16_is_close_but_not_exact():
    gen = torch.Generator().manual_seed(28)
    q, k, v = (x.to(torch.bfloat16).to(torch.float32) for x in qkv(gen, [16], [24], dtype=torch.float32))
    o, lse = call("attention", q, k, v, causal=True, return_lse=True)
    with precision.emulate(torch.bfloat16):
        o_lp, lse_lp = call("attention", q, k, v, causal=True, return_lse=True)
    assert o_lp.dtype == torch.float32 and lse_lp.dtype == torch.float32
    with precision.emulate(torch.float32):
        o_32 = call("attention", q, k, v, causal=True)
    err, err_32 = (o_lp - o).abs().max().item(), (o_32 - o).abs().max().item()
    assert err_32 < 1e-6  # float32 compute alone: errors of float32 size
    assert 1e-4 < err < 2e-2  # bf16 rounds the probabilities before P @ V: errors of bf16 size
    torch.testing.assert_close(lse_lp, lse, rtol=1e-5, atol=1e-5)  # q k^T exact for bf16 inputs, fp32 softmax
    # outside the context the reference is exact again
    torch.testing.assert_close(call("attention", q, k, v, causal=True), o, rtol=0, atol=0)


# ---- property-based tests against the brute force -----------------------------------------------

@st.composite
def ragged(draw, max_seqs=3, max_len=10):
    n = draw(st.integers(1, max_seqs))
    lens_k = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n))
    lens_q = [draw(st.integers(0, max_len)) for _ in lens_k]
    return lens_q, lens_k


@HYP
@given(lens=ragged(), hkv=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 3]), d=st.integers(1, 16),
       dv=st.integers(1, 16), causal=st.booleans(), left=st.integers(-1, 6), right=st.integers(-1, 6),
       softcap=st.sampled_from([0.0, 0.5, 3.0]), with_sinks=st.booleans(),
       scale=st.one_of(st.none(), st.floats(-2, 2, allow_nan=False)), seed=st.integers(0, 2**31 - 1))
def test_property_attention(lens, hkv, ratio, d, dv, causal, left, right, softcap, with_sinks, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = lens
    q, k, v = qkv(gen, lens_q, lens_k, hq=hkv * ratio, hkv=hkv, d=d, dv=dv)
    sinks = rand(gen, hkv * ratio, dtype=torch.float32) if with_sinks else None
    run_vs_brute(2 * q, k, v, lens_q, lens_k, causal=causal, window=(left, right), softcap=softcap, sinks=sinks,
                 scale=scale)


@HYP
@given(lens=ragged(max_len=14), per_seq=st.booleans(), per_head=st.booleans(), lo=st.integers(-4, 8),
       width=st.integers(0, 8), stride=st.integers(1, 5), bq=st.integers(1, 8), bk=st.integers(1, 8),
       extra=st.integers(0, 5), causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_block_mask(lens, per_seq, per_head, lo, width, stride, bq, bk, extra, causal, seed):
    """A random band-or-stride predicate, shifted per sequence/head, against the brute force."""
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = lens
    hq = 4
    nseq = len(lens_q)

    def pred(s, h, p, j):
        shift = (s if per_seq else 0) + (h if per_head else 0)
        band = (p - j >= lo + shift) & (p - j <= lo + shift + width)
        return band | ((p + j + shift) % stride == 0)
    bm = BlockMask.from_mask_mod(pred, max(lens_k) + extra, (bq, bk), num_seqs=nseq if per_seq else 1,
                                 num_heads=hq if per_head else 1)
    q, k, v = qkv(gen, lens_q, lens_k, hq=hq, hkv=2, d=4)
    run_vs_brute(q, k, v, lens_q, lens_k, causal=causal, block_mask=bm, mask_mod=lambda *a: bool(pred(*a)))


@HYP
@given(lens=ragged(max_len=12), hkv=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]), topk=st.integers(1, 8),
       softcap=st.sampled_from([0.0, 2.0]), with_sinks=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_sparse(lens, hkv, ratio, topk, softcap, with_sinks, seed):
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = lens
    hq = hkv * ratio
    q, k, v = qkv(gen, lens_q, lens_k, hq=hq, hkv=hkv, d=5, dv=3)
    rows = []
    for lq, lk in zip(lens_q, lens_k):
        for _ in range(lq * hkv):
            n = int(torch.randint(0, min(topk, lk) + 1, (1,), generator=gen))
            picked = torch.randperm(lk, generator=gen)[:n].tolist()  # without replacement
            row = picked + [-1] * (topk - n)
            rows.append([row[i] for i in torch.randperm(topk, generator=gen).tolist()])
    idx = torch.tensor(rows, dtype=torch.int32).reshape(sum(lens_q), hkv, topk)
    sinks = rand(gen, hq, dtype=torch.float32) if with_sinks else None
    o, lse = call("sparse_attention", q, k, v, idx, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k),
                  softcap=softcap, sinks=sinks, return_lse=True)
    want_o, want_lse = brute.sparse_attention(q, k, v, idx, cu_q=cu(lens_q), cu_k=cu(lens_k), softcap=softcap,
                                              sinks=sinks)
    assert_matches(o, lse, want_o, want_lse)


@HYP
@given(lens=ragged(max_len=12), bs=st.integers(1, 7), decode=st.booleans(), left=st.integers(-1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_property_paged(lens, bs, decode, left, seed):
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = lens
    if decode:
        lens_q = [1] * len(lens_k)
    q, k, v = qkv(gen, lens_q, lens_k, hq=2, hkv=1, d=4, dv=3)
    kc, vc, table = _paged(gen, k, v, lens_k, bs)
    o, lse = call("paged_attention", q, kc, vc, table, torch.tensor(lens_k, dtype=torch.int32),
                  cu_seqlens_q=None if decode else cu(lens_q), window_size=(left, -1), return_lse=True)
    want_o, want_lse = brute.paged_attention(q, kc, vc, table, lens_k, cu_q=cu(lens_q), causal=True,
                                             window=(left, -1))
    assert_matches(o, lse, want_o, want_lse)


@pytest.mark.parametrize("sinks", [False, True])
def test_merge_stays_on_the_inputs_device(sinks):
    """Every tensor the merge makes lives on its inputs' device (the `meta` device here stands in for a GPU:
    a CPU constant broadcast against them failed on an H200)."""
    o, lse = torch.empty(3, 2, 4, device="meta"), torch.empty(2, 3, device="meta")
    s = torch.empty(2, device="meta") if sinks else None
    got, got_lse = importlib.import_module("portable_attn.backends.reference.merge").merge_attention_states(
        o, lse, o, lse, sinks=s, return_lse=True)
    assert got.device.type == got_lse.device.type == "meta"
