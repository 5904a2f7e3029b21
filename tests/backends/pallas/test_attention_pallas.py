"""The pallas flash and top-k kernels in Pallas' TPU interpret mode, called directly (jax arrays), with
small tiles so that the tests' shapes span many tiles: key tiles skipped by causality, windows and
block masks (counted in the work list), query tiles aligned to positions (more queries than keys,
decode), paged caches read in place and gathered, sinks (-inf included), softcap, GQA, empty
sequences, bad unchecked indices; every result against the float64 reference."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import portable_attn as pa
from portable_attn.backends.pallas import attention, flash, paged, plan, sparse, tuning
from portable_attn.masks import BlockMask

from .common import arrays, check, index, reference

SMALL = tuning.Attention(block_q=8, block_k=16, sparse_queries=8)
CU = np.concatenate


def cu(lens):
    return CU([[0], np.cumsum(lens)]).astype(np.int32)


# float16 takes no path of its own in the kernels (its conformance cases check it): each dtype here is a minute of CI
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [
    dict(causal=True),
    dict(causal=True, window_size=(5, 0), softcap=4.0),
    dict(causal=False, window_size=(3, 9), sinks=True),
    dict(causal=False),
], ids=["causal", "window_softcap", "window_both_sinks", "full"])
def test_attention_varlen_many_tiles(dtype, opts):
    rng = np.random.default_rng(0)
    lq, lk = [9, 0, 37, 1, 20], [30, 4, 37, 50, 5]          # more queries than keys, empty, decode
    (q, k, v), (jq, jk, jv) = arrays(rng, (sum(lq), 6, 24), (sum(lk), 2, 24), (sum(lk), 2, 40), dtype=dtype)
    kw = dict(opts, softmax_scale=0.3)
    if kw.pop("sinks", False):
        sinks = torch.from_numpy(rng.standard_normal(6)).float()
        sinks[2] = -float("inf")                             # no sink for that head
        kw["sinks"] = sinks
    (tcq, jcq), (tck, jck) = index(cu(lq)), index(cu(lk))
    jkw = {n: jnp.asarray(x.numpy()) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    got = attention.attention(jq, jk, jv, cu_seqlens_q=jcq, cu_seqlens_k=jck, return_lse=True, table=SMALL, **jkw)
    check(got, reference("attention", q, k, v, cu_seqlens_q=tcq, cu_seqlens_k=tck, **kw), dtype)


def test_work_list_skips_tiles():
    """A window of 5 behind the diagonal visits at most 2 key tiles of 16 per query tile of 8; causal
    visits only tiles at or before the diagonal, and never more than the sequence has."""
    lq = lk = jnp.array([100], jnp.int32)
    for opts, most in (((1, 5, 0), 2), ((1, -1, -1), 7), ((0, -1, -1), 7)):
        wk = plan.work(lq, lk, jnp.array(opts, jnp.int32), bq=8, bk=16, nqt=13, nk=7, mask=None)
        count = np.asarray(wk.count)
        assert count.max() == most
        if opts[0]:  # causal: tile w (positions 8w..8w+7) needs key tiles 0..(8w+7)//16
            assert (count[:13] <= np.arange(13) * 8 // 16 + 1).all()


def test_block_mask_tiles_are_skipped_and_exact():
    """A random layout of EMPTY/PARTIAL/FULL 16x32 blocks per sequence and head, read with 8x16 tiles
    (4 tiles per block): every visited pair is a non-EMPTY block, and the result is exact."""
    rng = np.random.default_rng(1)
    lens = [40, 0, 33]
    layout = torch.from_numpy(rng.integers(0, 3, size=(3, 4, 3, 2))).to(torch.int8)
    index_ = torch.where(layout == 1, torch.from_numpy(rng.integers(0, 3, size=layout.shape)),
                         torch.tensor(-1)).to(torch.int32)
    mask = BlockMask.from_layout(layout, (16, 32), index_, torch.from_numpy(rng.random((3, 16, 32)) < 0.5))
    (q, k, v), (jq, jk, jv) = arrays(rng, (73, 4, 32), (73, 2, 32), (73, 2, 32))
    (tc, jc) = index(cu(lens))
    got = attention.attention(jq, jk, jv, cu_seqlens_q=jc, cu_seqlens_k=jc, causal=True, softmax_scale=0.2,
                              block_mask=mask, return_lse=True, table=SMALL)
    check(got, reference("attention", q, k, v, cu_seqlens_q=tc, cu_seqlens_k=tc, causal=True,
                         softmax_scale=0.2, block_mask=mask))
    m = plan.mask_for(mask, 8, 16)
    opts = jnp.array([1, -1, -1], jnp.int32)
    wk = plan.work(jnp.array(lens, jnp.int32), jnp.array(lens, jnp.int32), opts, bq=8, bk=16, nqt=12, nk=3, mask=m)
    full = plan.work(jnp.array(lens, jnp.int32), jnp.array(lens, jnp.int32), opts, bq=8, bk=16, nqt=12, nk=3,
                     mask=None)
    assert int(wk.count.sum()) < 4 * int(full.count.sum())   # EMPTY blocks dropped


def test_block_mask_blocks_must_fit_the_tiling():
    mask = BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 24, (4, 4))
    q = torch.randn(24, 2, 16)
    with pytest.raises(pa.NotSupported, match="multiples of 8"):
        pa.attention(q, q, q, block_mask=mask, backend="pallas")


@pytest.mark.parametrize("d, bs, native", [(128, 16, True), (32, 5, False), (32, 1, False)])
def test_paged_in_place_and_gathered(d, bs, native):
    rng = np.random.default_rng(2)
    lens = [45, 0, 17, 33]
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + 2
    perm = rng.permutation(total).astype(np.int32)
    table = np.full((4, max(nblocks) + 1), perm[-1], np.int32)
    used = 0
    for i, n in enumerate(nblocks):
        table[i, :n] = perm[used:used + n]
        used += n
    lq = [3, 0, 17, 1]
    (q, kc, vc), (jq, jkc, jvc) = arrays(rng, (21, 4, d), (total, bs, 2, d), (total, bs, 2, d), dtype=torch.bfloat16)
    (tt, jt), (ts, js), (tcq, jcq) = index(table), index(lens), index(cu(lq))
    assert flash.Keys(jkc, jvc, table=jt).native(None) == native
    got = paged.paged_attention(jq, jkc, jvc, jt, js, cu_seqlens_q=jcq, softmax_scale=0.1, window_size=(20, 0),
                                return_lse=True, table=SMALL)
    check(got, reference("paged_attention", q, kc, vc, tt, ts, cu_seqlens_q=tcq, softmax_scale=0.1,
                         window_size=(20, 0)), torch.bfloat16)


def test_bad_unchecked_indices_stay_inside(monkeypatch):
    """Block ids outside the cache, key counts past the table: a wrong answer is allowed, a fault or a
    NaN is not (reads are clamped)."""
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", "0")
    q, kc = torch.randn(2, 2, 16), torch.randn(3, 8, 1, 16)
    table = torch.tensor([[0, 7], [-5, 1]], dtype=torch.int32)
    o = pa.paged_attention(q, kc, kc, table, torch.tensor([30, 9], dtype=torch.int32), backend="pallas")
    assert torch.isfinite(o).all()
    idx = torch.tensor([[[0, 99, -7]], [[1, 2, 3]]], dtype=torch.int32)
    o = pa.sparse_attention(q, kc[0], kc[0], idx, backend="pallas")
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_varlen_sinks_softcap(dtype):
    rng = np.random.default_rng(3)
    lq, lk, topk = [12, 0, 9], [20, 3, 9], 6
    (q, k, v), (jq, jk, jv) = arrays(rng, (21, 4, 32), (32, 2, 32), (32, 2, 16), dtype=dtype)
    idx = np.full((21, 2, topk), -1, np.int32)
    t = 0
    for nq, nk in zip(lq, lk):
        for _ in range(nq):
            for h in range(2):
                n = int(rng.integers(0, topk))                  # rows with nothing listed included
                idx[t, h, :n] = rng.permutation(nk)[:n]
            t += 1
    sinks = torch.from_numpy(rng.standard_normal(4)).float()
    (ti, ji), (tcq, jcq), (tck, jck) = index(idx), index(cu(lq)), index(cu(lk))
    got = sparse.sparse_attention(jq, jk, jv, ji, cu_seqlens_q=jcq, cu_seqlens_k=jck, softcap=6.0,
                                  sinks=jnp.asarray(sinks.numpy()), softmax_scale=0.25, return_lse=True, table=SMALL)
    check(got, reference("sparse_attention", q, k, v, ti, cu_seqlens_q=tcq, cu_seqlens_k=tck, softcap=6.0,
                         sinks=sinks, softmax_scale=0.25), dtype)
