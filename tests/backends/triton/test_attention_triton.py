"""The triton flash kernel (attention, paged_attention) under Triton's interpreter on the CPU.

This module runs only when interpret mode is on for the whole process: `TRITON_INTERPRET=1` must be
set before any kernel module is imported (Triton fixes the mode when a kernel is decorated), so CI
runs it in a separate process, e.g.
`TRITON_INTERPRET=1 PORTABLE_ATTN_INTERPRET=1 pytest -n 2 tests/backends/triton` (pytest-xdist, so a
crash of the interpreter costs one test, not the run). Without the variable it is skipped.

Covers the bf16-dot canary and the `dot` helper, key tiles skipped by the loop bounds (band) and by
the block mask (EMPTY), paged caches with odd block sizes and shuffled tables, strided inputs and
outputs, head dims 80 and 256, empty rows, and bad unchecked indices; every result against the
float64 reference (`backend="reference"`). The last test compiles the kernel for GPU targets in a
child process without the interpreter.
"""
from __future__ import annotations


import pytest
import torch

from tests.backends.triton.child import skip_unless_interpreting

skip_unless_interpreting()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import portable_attn as pa  # noqa: E402
from tests.backends.compare import against_reference, assert_close, paged_cache  # noqa: E402
from tests.backends.triton.child import VENDORS, assert_lowers, assert_survives  # noqa: E402
from portable_attn.backends.triton import common, flash, tuning  # noqa: E402
from portable_attn.masks import BlockMask  # noqa: E402


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(dtype)


def run_both(op, *args, **kw):
    return against_reference("triton", op, *args, **kw)


# ---- the dot helper ---------------------------------------------------------------------------

@triton.jit
def _raw_dot(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(o_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


@triton.jit
def _helper_dot(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(o_ptr + i[:, None] * N + i[None, :], common.dot(a, b))


def _dot_error(kernel, dtype):
    g = gen(1)
    a, b = rand(32, 32, dtype=dtype, g=g), rand(32, 32, dtype=dtype, g=g)
    o = torch.empty(32, 32)
    kernel[(1,)](a, b, o, N=32)
    return float((o - a.float() @ b.float()).abs().max())


def test_bf16_dot_canary():
    """The interpreter's raw bf16 tl.dot is still wrong. When this fails, upstream fixed it: drop the
    float32 upcast from common.dot (and this test)."""
    assert common.INTERPRET and common.UPCAST_DOT
    assert _dot_error(_raw_dot, torch.bfloat16) > 1.0


@triton.jit
def _cast(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(y_ptr.dtype.element_ty))


def test_bf16_casts_round_to_nearest():
    """float32 -> bfloat16 in a kernel rounds as torch (and the GPU) does; the interpreter alone truncates,
    common.py corrects it. When the raw interpreter rounds, upstream fixed it: drop common._round_bf16_casts."""
    x = torch.tensor([0.99999, -0.99999, 1 + 2 ** -8 + 2 ** -10, 0.3333333, 3e-39, 1e30, 2.0, -0.0])
    y = torch.empty(8, dtype=torch.bfloat16)
    _cast[(1,)](x, y, N=8)
    assert torch.equal(y.float(), x.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_helper_is_right(dtype):
    assert _dot_error(_helper_dot, dtype) < 1e-4


# ---- tuning -------------------------------------------------------------------------------------

def test_tables_per_vendor():
    from portable_attn.platforms import Platform

    t = tuning.TABLES
    assert dict(t[Platform.ROCM].options)["waves_per_eu"] >= 1
    assert dict(t[Platform.XPU].options)["grf_mode"] == "large" and t[Platform.XPU].num_warps == 16
    assert t["interpret"].block_m <= 16 and t["interpret"].options == ()
    assert tuning.entry(torch.empty(1)) is t["interpret"]  # interpreting: whatever the platform


@pytest.mark.parametrize("group,max_q,mask", [(1, 1, None), (3, 100, None), (8, 5, None), (80, 2, None),
                                              (2, 50, (16, 16)), (2, 50, (48, 8)), (1, 9, (1, 1)), (4, 1, (3, 5))])
def test_tile_geometry(group, max_q, mask):
    x = torch.empty(1)
    tl_ = tuning.flash_tiles(x, group=group, max_q=max_q, head_dim=80, head_dim_v=16, mask_block=mask)
    e = tuning.entry(x)
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    assert all(pow2(n) for n in (tl_.block_q, tl_.block_h, tl_.block_n, tl_.block_d, tl_.block_dv))
    assert tl_.rows >= e.min_dot and tl_.block_n >= e.min_dot and tl_.block_d == 128 and tl_.block_dv == 16
    assert group % tl_.heads == 0 and tl_.heads <= tl_.block_h and tl_.heads <= e.max_rows
    if mask is not None:  # table rows: mask query blocks the tile divides, or the query tiles themselves
        assert (tl_.mask_rows == mask[0] and mask[0] % tl_.block_q == 0) or tl_.mask_rows == tl_.block_q


# ---- work follows the visible pattern ------------------------------------------------------------

def _expected_visits(lq, lk, hq, group, tiles, vis_of, aligned):
    """Per program, the key tiles holding a visible pair for one of its rows (vis_of(h) -> [Lq, Lk])."""
    off = lk - lq
    n_m = -(-lq // tiles.block_q) + (1 if aligned else 0)
    vis = torch.stack([vis_of(h) for h in range(hq)])  # [Hq, Lq, Lk]
    nkt = -(-lk // tiles.block_n)
    padded = torch.zeros(hq, lq, nkt * tiles.block_n, dtype=torch.bool)
    padded[..., :lk] = vis
    per_tile = padded.view(hq, lq, nkt, tiles.block_n).any(-1)  # [Hq, Lq, nkt]
    out = torch.zeros(n_m, hq // tiles.heads, dtype=torch.int32)
    for m in range(n_m):
        t0 = ((off // tiles.block_q) + m) * tiles.block_q - off if aligned else m * tiles.block_q
        rows = [t for t in range(t0, t0 + tiles.block_q) if 0 <= t < lq]
        for hg in range(hq // tiles.heads):
            heads = range(hg * tiles.heads, (hg + 1) * tiles.heads)
            if rows:
                out[m, hg] = int(per_tile[list(heads)][:, rows].any(0).any(0).sum())
    return out


def _expected_edges(lq, lk, tiles, band):
    """Per program, the key tiles some of whose keys in the rows' union band [lo, hi) some row does not see
    (band [Lq, Lk]; one sequence, every head alike)."""
    n_m = -(-lq // tiles.block_q)
    out = torch.zeros(n_m, 1, dtype=torch.int32)
    for m in range(n_m):
        rows = band[m * tiles.block_q:(m + 1) * tiles.block_q]
        union = rows.any(0).nonzero()
        if union.numel():
            lo, hi = int(union.min()), int(union.max()) + 1
            for kt in range(lo // tiles.block_n, -(-hi // tiles.block_n)):
                keys = slice(max(kt * tiles.block_n, lo), min((kt + 1) * tiles.block_n, hi))
                out[m] += int(not rows[:, keys].all())
    return out


def _visits(q, k, v, **kw):
    visits = torch.zeros(1 << 15, dtype=torch.int32)
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    o = torch.empty(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[1], q.shape[0])
    grid = flash.forward(q, k, v, o, lse, cu_q=cu_q, cu_k=cu_k, max_q=q.shape[0], visits=visits,
                         scale=q.shape[2] ** -0.5, softcap=0.0, sinks=None, **kw)
    counts = visits[:3 * grid[0] * grid[1]].view(grid[0], grid[1], 3)
    return counts[..., 0], counts[..., 1], counts[..., 2], o, lse


@pytest.mark.parametrize("lq,lk,causal,window", [(256, 256, True, (15, 0)), (96, 200, True, (20, 0)),
                                                 (128, 128, False, (5, 9)), (160, 160, True, (-1, -1))])
def test_band_skipping(lq, lk, causal, window):
    """The loop visits exactly the key tiles the causal/window band reaches, never Lk / BLOCK_N
    (counted by the kernel itself: `visits` is its test hook)."""
    g = gen(2)
    hq, hkv, d = 4, 2, 16
    q, k, v = rand(lq, hq, d, g=g), rand(lk, hkv, d, g=g), rand(lk, hkv, d, g=g)
    visits, masked, edges, o, lse = _visits(q, k, v, causal=causal, window=window, block_mask=None)
    assert not masked.any()  # no block mask, no element masks from it
    tiles = tuning.flash_tiles(q, group=hq // hkv, max_q=lq, head_dim=d, head_dim_v=d)
    p = torch.arange(lq) + lk - lq
    j = torch.arange(lk)
    band = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        band &= j[None] <= p[:, None]
    if window[0] >= 0:
        band &= j[None] >= p[:, None] - window[0]
    if window[1] >= 0:
        band &= j[None] <= p[:, None] + window[1]
    want = _expected_visits(lq, lk, hq, hq // hkv, tiles, lambda h: band, aligned=False)
    assert torch.equal(visits, want)
    assert torch.equal(edges, _expected_edges(lq, lk, tiles, band).expand_as(edges))
    if window != (-1, -1):
        dense = -(-lk // tiles.block_n)
        assert int(visits.max()) <= -(-(tiles.block_q + sum(max(w, 0) for w in window)) // tiles.block_n) + 1
        assert int(visits.max()) < dense
    ref = pa.attention(q.double(), k.double(), v.double(), causal=causal, window_size=window, return_lse=True,
                       backend="reference")
    assert_close((o, lse), ref)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bq", [16, 4])
def test_block_mask_skips_empty_tiles(per_head, bq):
    """Diagonal FULL blocks plus one scattered PARTIAL block per row: EMPTY key tiles are never
    visited, the FULL tile takes no element mask, PARTIAL ones do; the result is the reference's.
    bq = 16: tables per mask query block (tiles of 8 queries inside one); bq = 4: per query tile."""
    g = gen(3)
    lq = lk = 192
    hq, hkv, d, bk = 4, 2, 16, 16
    nqb, nkb = lq // bq, lk // bk
    heads = hq if per_head else 1
    layout = torch.zeros(1, heads, nqb, nkb, dtype=torch.int8)
    rows = torch.arange(nqb)
    diag = rows * bq // bk
    for h in range(heads):
        layout[0, h, rows, diag] = 2
        layout[0, h, rows, (diag + 1 + (rows + 2 * h) % (nkb - 1)) % nkb] = 1  # never on the diagonal
    index = torch.where(layout == 1, torch.tensor(0), torch.tensor(-1)).to(torch.int32)
    pmask = (torch.rand(1, bq, bk, generator=g) < 0.5)
    bm = BlockMask.from_layout(layout, (bq, bk), index, pmask)
    q, k, v = rand(lq, hq, d, g=g), rand(lk, hkv, d, g=g), rand(lk, hkv, d, g=g)
    visits, masked, edges, o, lse = _visits(q, k, v, causal=False, window=(-1, -1), block_mask=bm)
    tiles = tuning.flash_tiles(q, group=hq // hkv, max_q=lq, head_dim=d, head_dim_v=d, mask_block=(bq, bk))
    assert tiles.block_n == bk and tiles.mask_rows == (bq if bq >= tiles.block_q else tiles.block_q)
    pos = torch.arange(lk)
    want = _expected_visits(lq, lk, hq, hq // hkv, tiles, lambda h: bm.dense(0, h, pos, pos), aligned=True)
    assert torch.equal(visits, want)
    packed = 2 if per_head else 1  # scattered blocks of the heads packed in a tile
    assert int(visits.max()) <= 1 + packed * max(1, tiles.block_q // bq)
    assert torch.equal(masked, torch.where(visits > 0, visits - 1, 0))
    assert torch.equal(edges, visits)  # with a block mask every tile is an edge tile
    ref = pa.attention(q.double(), k.double(), v.double(), block_mask=bm, return_lse=True, backend="reference")
    assert_close((o, lse), ref)


@pytest.mark.parametrize("block", [(16, 16), (8, 32), (12, 20), (1, 1), (48, 5)])
def test_block_mask_any_block_size(block):
    """Block sizes that are not the kernel's tiles: tiles cover several (or parts of) mask blocks."""
    g = gen(4)
    lens = [50, 0, 29]
    cu = torch.tensor([0, 50, 50, 79], dtype=torch.int32)
    q, k, v = rand(79, 4, 16, g=g), rand(79, 2, 16, g=g), rand(79, 2, 16, g=g)
    bm = BlockMask.from_mask_mod(lambda s, h, p, j: ((p - j) % 7 < 3) | (j < 4), max(lens), block, num_seqs=3)
    assert_close(*run_both("attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, block_mask=bm))


# ---- paged ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_odd_blocks_shuffled(bs, dtype):
    g = gen(5 + bs)
    lens = [1, 17, 40, 0, 9]
    kc, vc, table, seqused = paged_cache(g, lens, bs, 2, 32, 16, dtype)
    q = rand(len(lens), 6, 32, dtype=dtype, g=g)
    sinks = rand(6, g=g)
    assert_close(*run_both("paged_attention", q, kc, vc, table, seqused, sinks=sinks), dtype)  # decode
    assert_close(*run_both("paged_attention", q, kc, vc, table, seqused, window_size=(6, 0), softcap=8.0), dtype)
    lq = [1, 5, 12, 0, 9]  # chunked prefill, the last sequence all new
    cu_q = torch.tensor([0, 1, 6, 18, 18, 27], dtype=torch.int32)
    qc = rand(27, 6, 32, dtype=dtype, g=g)
    assert sum(lq) == 27
    assert_close(*run_both("paged_attention", qc, kc, vc, table, seqused, cu_seqlens_q=cu_q, sinks=sinks), dtype)
    bm = BlockMask.strided(40, 5, 3, (8, 8))
    assert_close(*run_both("paged_attention", qc, kc, vc, table, seqused, cu_seqlens_q=cu_q, block_mask=bm), dtype)


def test_paged_equals_attention_on_gathered_keys():
    g = gen(9)
    lens, bs = [23, 31], 3
    kc, vc, table, seqused = paged_cache(g, lens, bs, 1, 16, 16)
    q = rand(2, 4, 16, g=g)
    got = pa.paged_attention(q, kc, vc, table, seqused, backend="triton")
    ks = [torch.stack([kc[table[i, j // bs], j % bs] for j in range(n)]) for i, n in enumerate(lens)]
    vs = [torch.stack([vc[table[i, j // bs], j % bs] for j in range(n)]) for i, n in enumerate(lens)]
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 23, 54], dtype=torch.int32)
    want = pa.attention(q, torch.cat(ks), torch.cat(vs), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                        backend="triton")
    assert float((got - want).abs().max()) < 1e-5


# ---- strides, head dims, edge rows ----------------------------------------------------------------

def test_strided_inputs_and_out():
    """q, k, v as views of one qkv buffer (heads interleaved, a non-unit stride on the head dim),
    out= a non-contiguous view; paged caches as views of one kv buffer."""
    g = gen(10)
    qkv = rand(150, 3, 4, 64, g=g)
    q, k, v = qkv[:, 0, :, ::2], qkv[:, 1, :2, 1::2], qkv[:, 2, 2:, :32]
    cu = torch.tensor([0, 40, 150], dtype=torch.int32)
    big = torch.full((150, 4, 48), float("nan"))
    out = big[:, :, 8:40]
    for kw in ({"causal": True}, {"causal": True, "window_size": (20, 0)}, {"softcap": 3.0}):
        big.fill_(float("nan"))
        mine, ref = run_both("attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, out=out, **kw)
        assert mine[0].data_ptr() == out.data_ptr()
        assert_close(mine, ref)
        assert torch.isnan(big[:, :, :8]).all() and torch.isnan(big[:, :, 40:]).all()  # nothing else written
    kv = rand(12, 2, 5, 2, 32, g=g)  # [NB, 2, BS, Hkv, D]: k and v caches are views kv[:, 0], kv[:, 1]
    table = torch.randperm(12, generator=g)[:8].to(torch.int32).view(2, 4)
    seqused = torch.tensor([17, 20], dtype=torch.int32)
    qd = rand(2, 8, 4, 32, g=g)[:, :, 1]  # [2, 8, 32] with a row stride of 4 * 32
    assert_close(*run_both("paged_attention", qd, kv[:, 0], kv[:, 1], table, seqused))
    assert_close(*run_both("paged_attention", qd, kv[:, 0], kv[:, 1], table.t().contiguous().t(), seqused))


@pytest.mark.parametrize("d,dv", [(80, 80), (256, 256), (80, 24), (256, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(d, dv, dtype):
    g = gen(11)
    q, k, v = rand(19, 2, d, dtype=dtype, g=g), rand(19, 1, d, dtype=dtype, g=g), rand(19, 1, dv, dtype=dtype, g=g)
    assert_close(*run_both("attention", q, k, v, causal=True, sinks=rand(2, g=g)), dtype)


def test_head_dim_above_256_is_unsupported():
    q = torch.randn(4, 2, 320)
    with pytest.raises(pa.NotSupported, match="head dim 320"):
        pa.attention(q, q, q, backend="triton")


def test_large_group_splits_into_head_packs():
    """80 query heads on one kv head: more than a tile's rows, split into packs of 40."""
    g = gen(12)
    q, k, v = rand(5, 80, 16, g=g), rand(9, 1, 16, g=g), rand(9, 1, 16, g=g)
    assert tuning.flash_tiles(q, group=80, max_q=5, head_dim=16, head_dim_v=16).heads == 40
    assert_close(*run_both("attention", q, k, v, causal=True, window_size=(3, 0)))


def test_rows_that_see_nothing():
    """Queries before the first key (causal), empty sequences, scale 0: o = 0, lse = -inf (or the sink)."""
    g = gen(13)
    cu_q = torch.tensor([0, 20, 20, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 13, 13], dtype=torch.int32)
    q, k, v = rand(23, 4, 16, g=g), rand(13, 2, 16, g=g), rand(13, 2, 16, g=g)
    mine, ref = run_both("attention", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert_close(mine, ref)
    assert torch.isinf(mine[1][:, :12]).all() and (mine[0][:12] == 0).all()
    sinks = torch.tensor([0.5, float("-inf"), -1.0, 2.0])
    mine, ref = run_both("attention", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, sinks=sinks)
    assert_close(mine, ref)
    assert torch.equal(mine[1][:, 20], torch.tensor([0.5, float("-inf"), -1.0, 2.0]))
    assert_close(*run_both("attention", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=0.0))


def test_deterministic_and_max_seqlen_hint():
    g = gen(14)
    cu = torch.tensor([0, 33, 50], dtype=torch.int32)
    q, k, v = rand(50, 4, 32, dtype=torch.bfloat16, g=g), rand(50, 2, 32, dtype=torch.bfloat16, g=g), \
        rand(50, 2, 32, dtype=torch.bfloat16, g=g)
    a = pa.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="triton")
    b = pa.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, max_seqlen_q=40, max_seqlen_k=40,
                     backend="triton")
    assert torch.equal(a, b)


# ---- bad unchecked indices: a wrong answer at worst, never a fault -------------------------------

def test_bad_indices_never_fault():
    """With PORTABLE_ATTN_CHECK=0, out-of-range block ids, seqused_k past the table and cu_seqlens past
    the tensors run to the end (in a child process: a fault there fails this test, not the run)."""
    assert_survives("""
        import torch, portable_attn as pa
        from portable_attn.masks import BlockMask
        g = torch.Generator().manual_seed(0)
        kc, vc = torch.randn(4, 5, 2, 16, generator=g), torch.randn(4, 5, 2, 16, generator=g)
        q = torch.randn(3, 4, 16, generator=g)
        table = torch.tensor([[0, 1, 99], [-7, 3, 2], [1, 2, 3]], dtype=torch.int32)
        seqused = torch.tensor([14, 400, 9], dtype=torch.int32)
        o = pa.paged_attention(q, kc, vc, table, seqused, backend="triton")
        o = pa.paged_attention(q, kc, vc, torch.zeros(3, 0, dtype=torch.int32), seqused, backend="triton")
        o = pa.paged_attention(q, kc[:0], vc[:0], table, seqused, backend="triton")
        k = torch.randn(10, 2, 16, generator=g)
        cu_q = torch.tensor([0, 2, 3], dtype=torch.int32)
        cu_k = torch.tensor([0, 7, 500], dtype=torch.int32)
        o = pa.attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2, backend="triton")
        bm = BlockMask.from_layout(torch.full((1, 1), 2, dtype=torch.int8), (4, 4))
        o = pa.attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2, block_mask=bm,
                         backend="triton")
    """)


# ---- the compiled kernel ------------------------------------------------------------------------

@pytest.mark.parametrize("vendor", VENDORS)
def test_kernel_compiles_for_gpu_targets(vendor):
    """Lower the flash kernel (each constexpr path) for a GPU target (tests/backends/triton/lowering.py)."""
    assert_lowers(vendor, """
        from portable_attn.backends.triton import flash
        fn = flash._flash_fwd
        ptrs = {"LSE": "*fp32", "SINKS": "*fp32", "LAYOUT": "*i8", "PMASK": "*u8", "TSTATE": "*i8"}
        i32 = {"CU_Q", "CU_K", "SEQUSED", "BLOCK_TABLE", "PIDX", "TCUM", "TIDX", "VISITS"}
        consts = [p.name for p in fn.params if p.is_constexpr]
        cases = [("fp16", False, False, False, False, False, 32, 4, 64, 128, 128),
                 ("bf16", True, True, False, True, True, 1, 16, 64, 128, 128),
                 ("fp32", True, False, True, False, True, 16, 2, 64, 64, 32),
                 ("fp32", True, True, True, False, False, 32, 2, 32, 32, 32),  # failed with triton 3.6's FMA dot
                 ("bf16", True, True, True, True, False, 8, 2, 32, 256, 256),
                 ("fp32", False, False, False, False, False, 64, 1, 16, 256, 256)]  # a fault on an H200 (tf32x3)
        runs = []
        for dt, varlen, paged, mask, cap, sinks, bq, bh, bn, bd, bdv in cases:
            sig = {}
            for name in fn.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in ("Q", "K", "V", "O"):
                    sig[name] = "*" + dt
                elif name in ptrs:
                    sig[name] = ptrs[name]
                elif name in i32:
                    sig[name] = "*i32"
                elif name in ("scale2", "cap2", "inv_cap"):
                    sig[name] = "fp32"
                else:
                    sig[name] = "i32"
            ce = dict(GROUP=4, HEADS=min(bh, 4), VARLEN=varlen, SOFTCAP=cap, HAS_SINKS=sinks, PAGED=paged,
                      HAS_MASK=mask, MASK_SEQS=mask, MASK_HEADS=mask, STORE_LSE=True, COUNT=False,
                      BLOCK_Q=bq, BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
            runs.append((fn, sig, ce))
    """, {"num_warps": 4, "num_stages": 3 if vendor == "cuda" else 1})
