"""The flash-attention forward kernel that `attention` and `paged_attention` share.

Grid: (S x query tiles, kv-head groups). A program owns one tile of rows = (query heads of one kv
group, up to `heads`) x (BLOCK_Q queries of one sequence); the group's heads share every K/V tile it
loads (GQA/MQA packing). It walks the key tiles its queries can see with an online softmax in float32:

- **Band.** From the tile's first and last query positions (`p = t + Lk - Lq`) the loop runs over
  the key tiles in `[lo, hi)` only: `lo` from the left window side, `hi` from causality, the right
  window side and `Lk`. Key tiles outside the causal/window band are never visited.
- **Block mask.** Query tiles are aligned to positions, and the host turns the layout into, per
  (row, key tile), an EMPTY/PARTIAL/FULL state (over every mask block and packed head the pair
  covers) plus the compacted list of non-empty key tiles and its running count; a row is a mask
  query block when the query tile divides it (decode: tables stay the layout's size), else a query
  tile (odd or small mask blocks). A program loops over `list[count[lo_tile] : count[hi_tile]]`:
  EMPTY key tiles are never visited; FULL ones take no element mask; PARTIAL ones gather their
  element mask from `partial_masks`. With the mask's key block a power of two in the tuning range,
  BLOCK_N equals it (FULL blocks map to FULL tiles).
- **Paged** (`PAGED` constexpr): key `j` of sequence `s` is read from slot
  `block_table[s, j // BS] * BS + j % BS` of the cache, any BS >= 1; `Lk = seqused_k[s]`.

Every load is masked or clamped (block ids outside [0, NB) and table columns past max_blocks read
nothing, token rows stay inside the tensors), so a bad unchecked index gives a wrong answer, never a
fault. Memory a query cannot see may hold NaN or Inf: keys outside every row's band are never loaded,
and a value row only some rows of a tile see reaches only those rows (`_tile`). Strides of q, k, v, the
caches, the block table and the outputs are honoured; the small tensors (cu_seqlens, seqused_k, sinks,
the block-mask tables) are made contiguous on the host.
Scores are kept in base 2 (`exp2`), the scale folded with log2(e).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portable_attn.masks import EMPTY, FULL, PARTIAL

from .common import BIG, LOG2E, dense, dot, stride, tanh
from .tuning import flash_tiles

MASK_PARTIAL = tl.constexpr(PARTIAL)
MASK_FULL = tl.constexpr(FULL)


@triton.jit
def _mask_elements(LAYOUT, PIDX, PMASK, lay_base, hm, p, j, ok, bq, bk, nqb, nkb, n_pm, lay_sh):
    """What the block mask allows the [rows, keys] pairs (p, j) where `ok`: bool [rows, keys]."""
    inside = ok & (p[:, None] >= 0) & (p[:, None] < nqb * bq) & (j[None, :] < nkb * bk)
    # clamps inlined, not through a jit helper: each helper call costs the interpreter about 1 ms
    qb = tl.minimum(tl.maximum(p // bq, 0), nqb - 1)
    kb = tl.minimum(j // bk, nkb - 1)
    off = lay_base + hm[:, None].to(tl.int64) * lay_sh + qb[:, None].to(tl.int64) * nkb + kb[None, :]
    state = tl.load(LAYOUT + off, mask=inside, other=0)
    part = inside & (state == MASK_PARTIAL)
    idx = tl.load(PIDX + off, mask=part, other=0)
    idx = tl.minimum(tl.maximum(idx, 0), n_pm - 1).to(tl.int64)
    inner = tl.load(PMASK + idx * (bq * bk) + (p % bq)[:, None] * bk + (j % bk)[None, :], mask=part, other=0)
    return inside & ((state == MASK_FULL) | (part & (inner != 0)))


@triton.jit
def _tile(acc, m_i, l_i, q, kt, lo, hi, p, row_ok, state, lay_base, hm,
          K, V, BLOCK_TABLE, LAYOUT, PIDX, PMASK, s, ks, hk, d, dv,
          sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sbt_s, sbt_b,
          Tk, D, DV, NB, BS, MAXB, scale2, cap2, inv_cap, left, right, bq, bk, nqb, nkb, n_pm, lay_sh,
          SOFTCAP: tl.constexpr, PAGED: tl.constexpr, HAS_MASK: tl.constexpr, EDGE: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Key tile `kt` of the online softmax: (acc [rows, DV], m_i, l_i) updated. EDGE: some rows may not see
    some keys of the tile in [lo, hi) (the causal/window edges, block masks): pairs are masked one by one,
    and a NaN or Inf value reaches only the rows that see its key (non-finite values leave P @ V; one exact
    bf16 dot counts, per output element, the NaN / +Inf / -Inf of the keys a row weighs (e > 0) as base-128
    digits). An interior tile (every row sees every key of it in [lo, hi)) takes neither: only keys outside
    [lo, hi) are masked."""
    tl.static_assert(BLOCK_N < 128)  # the base-128 counts
    j = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_ok = (j >= lo) & (j < hi)
    if PAGED:
        col = j // BS  # j >= 0
        kv_ok = kv_ok & (col < MAXB)
        blk = tl.load(BLOCK_TABLE + s.to(tl.int64) * sbt_s + col * sbt_b, mask=kv_ok, other=0)
        kv_ok = kv_ok & (blk >= 0) & (blk < NB)  # a bad block id reads nothing
        blk = tl.minimum(tl.maximum(blk, 0), NB - 1).to(tl.int64)
        k_row = blk * sk_b + (j % BS) * sk_t
        v_row = blk * sv_b + (j % BS) * sv_t
    else:
        kv_ok = kv_ok & (ks + j >= 0) & (ks + j < Tk)
        k_row = (ks + j).to(tl.int64) * sk_t
        v_row = (ks + j).to(tl.int64) * sv_t
    kT = tl.load(K + k_row[None, :] + hk * sk_h + d[:, None] * sk_d,
                 mask=kv_ok[None, :] & (d[:, None] < D), other=0.0)
    qk = dot(q, kT)
    if SOFTCAP:
        qk = cap2 * tanh(qk * inv_cap)
    else:
        qk = qk * scale2
    if EDGE:
        # causal and window per pair (causal is `right` <= 0; "unbounded" sides are BIG)
        vis = row_ok[:, None] & kv_ok[None, :] & (j[None, :] <= p[:, None] + right) & (j[None, :] >= p[:, None] - left)
        if HAS_MASK:
            if state != MASK_FULL:
                vis = _mask_elements(LAYOUT, PIDX, PMASK, lay_base, hm, p, j, vis, bq, bk, nqb, nkb, n_pm, lay_sh)
        qk = tl.where(vis, qk, float("-inf"))
    else:
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep zeros, no NaN
    alpha = tl.exp2(m_i - m_use)
    e = tl.exp2(qk - m_use[:, None])
    v = tl.load(V + v_row[:, None] + hk * sv_h + dv[None, :] * sv_d,
                mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
    if EDGE:
        vf = v.to(tl.float32)
        pv = dot(e.to(v.dtype), tl.where(tl.abs(vf) < float("inf"), v, 0.0).to(v.dtype))
        flag = tl.where(vf != vf, 1.0, tl.where(vf == float("inf"), 128.0, tl.where(vf == float("-inf"), 16384.0, 0.0)))
        seen = dot((e > 0).to(tl.bfloat16), flag.to(tl.bfloat16))              # [rows, DV], whole numbers
        neg = tl.floor(seen / 16384.0)
        pos = tl.floor(seen / 128.0) - neg * 128.0
        nan = seen - tl.floor(seen / 128.0) * 128.0
        pv = tl.where((nan > 0) | ((pos > 0) & (neg > 0)), float("nan"),
                      tl.where(pos > 0, float("inf"), tl.where(neg > 0, float("-inf"), pv)))
    else:
        pv = dot(e.to(v.dtype), v)
    return acc * alpha[:, None] + pv, m_new, l_i * alpha + tl.sum(e, 1)


@triton.jit
def _flash_fwd(
    Q, K, V, O, LSE, SINKS, CU_Q, CU_K, SEQUSED, BLOCK_TABLE,
    LAYOUT, PIDX, PMASK, TSTATE, TCUM, TIDX, VISITS,
    sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_t, so_h, so_d,
    sl_h, sl_t,
    sbt_s, sbt_b,
    Tq, Tk, Hq, D, DV, NB, BS, MAXB, n_m,
    scale2, cap2, inv_cap, left, right,
    bq, bk, nqb, nkb, rq, nrows, nkt, n_pm, lay_ss, lay_sh, tab_ss, tab_sh,
    GROUP: tl.constexpr, HEADS: tl.constexpr,
    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, PAGED: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_SEQS: tl.constexpr, MASK_HEADS: tl.constexpr,
    STORE_LSE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_H
    pid = tl.program_id(0)
    hg = tl.program_id(1)
    s = pid // n_m
    m = pid % n_m
    hk = (hg * HEADS) // GROUP  # the kv head of this tile's query heads

    if VARLEN:
        qs = tl.load(CU_Q + s)
        lq = tl.load(CU_Q + s + 1) - qs
    else:  # one sequence: no index tensors (nothing to copy to the device, CUDA-graph friendly)
        qs = 0
        lq = Tq
    if PAGED:
        ks = 0
        lk = tl.load(SEQUSED + s)
    elif VARLEN:
        ks = tl.load(CU_K + s)
        lk = tl.load(CU_K + s + 1) - ks
    else:
        ks = 0
        lk = Tk
    off = lk - lq  # position of query t is t + off

    if HAS_MASK:
        # tiles aligned to positions: tile m of a sequence holds positions [(qt0 + m) * BLOCK_Q, + BLOCK_Q)
        lq_pad = tl.cdiv(tl.maximum(lq, 0), BLOCK_Q) * BLOCK_Q
        qt = (off + lq_pad) // BLOCK_Q - lq_pad // BLOCK_Q + m  # floor(off / BLOCK_Q) + m, no negative division
        t0 = qt * BLOCK_Q - off
    else:
        qt = m
        t0 = m * BLOCK_Q

    count = 0   # key tiles visited, of them the edge tiles and the ones with a block mask's elements (COUNT: tests)
    edges = 0
    masked = 0
    if t0 < lq:
        r = tl.arange(0, BLOCK_M)
        hh = r // BLOCK_Q
        t = t0 + r % BLOCK_Q
        h = hg * HEADS + tl.minimum(hh, HEADS - 1)  # padding rows read a real head, write nothing
        row_ok = (hh < HEADS) & (t >= 0) & (t < lq) & (qs + t >= 0) & (qs + t < Tq)
        p = t + off
        row = (qs + t).to(tl.int64)

        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + row[:, None] * sq_t + h[:, None].to(tl.int64) * sq_h + d[None, :] * sq_d,
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)

        # the keys any row of the tile can see: [lo, hi)
        p_lo = tl.maximum(t0, 0) + off
        p_hi = tl.minimum(t0 + BLOCK_Q, lq) - 1 + off
        lo = tl.maximum(p_lo - left, 0)
        hi = tl.minimum(p_hi + right + 1, lk)
        kt_lo = lo // BLOCK_N
        kt_hi = tl.maximum(tl.cdiv(hi, BLOCK_N), kt_lo)
        if HAS_MASK:
            # the tables' row of this tile: its mask query block (rq = bq, the tile inside it) or the
            # tile itself (rq = BLOCK_Q)
            qr = (qt * BLOCK_Q) // rq
            tab = tl.minimum(tl.maximum(qr, 0), nrows - 1).to(tl.int64) * (nkt + 1)
            lay_base = tab * 0
            hm = h * 0
            if MASK_SEQS:
                tab += s.to(tl.int64) * tab_ss
                lay_base += s.to(tl.int64) * lay_ss
            if MASK_HEADS:
                tab += hg.to(tl.int64) * tab_sh
                hm = h
            inside = (qt >= 0) & (qr < nrows)  # positions outside the layout see nothing
            kt_hi = tl.where(inside, tl.minimum(kt_hi, nkt), 0)
            kt_lo = tl.minimum(kt_lo, kt_hi)
            start = tl.load(TCUM + tab + kt_lo)
            end = tl.load(TCUM + tab + kt_hi)
        else:
            start = kt_lo
            end = kt_hi

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        if HAS_MASK:
            for i in range(start, end):
                kt = tl.load(TIDX + tab + i)
                state = tl.load(TSTATE + tab + kt)
                acc, m_i, l_i = _tile(
                    acc, m_i, l_i, q, kt, lo, hi, p, row_ok, state, lay_base, hm, K, V, BLOCK_TABLE, LAYOUT, PIDX,
                    PMASK, s, ks, hk, d, dv, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sbt_s, sbt_b, Tk, D, DV,
                    NB, BS, MAXB, scale2, cap2, inv_cap, left, right, bq, bk, nqb, nkb, n_pm, lay_sh,
                    SOFTCAP=SOFTCAP, PAGED=PAGED, HAS_MASK=True, EDGE=True, BLOCK_N=BLOCK_N)
                if COUNT:
                    count += 1
                    edges += 1
                    masked += (state != MASK_FULL).to(tl.int32)
        else:
            # the interior key tiles [in_lo, in_hi): every row of the tile sees all their keys in [lo, hi);
            # the edge tiles before and after them take the per-pair masks
            in_lo = tl.where(lo >= p_hi - left, kt_lo, tl.cdiv(tl.maximum(p_hi - left, 0), BLOCK_N))
            in_lo = tl.minimum(tl.maximum(in_lo, kt_lo), kt_hi)
            in_hi = tl.where(hi - 1 <= p_lo + right, kt_hi, tl.maximum(p_lo + right + 1, 0) // BLOCK_N)
            in_hi = tl.maximum(tl.minimum(in_hi, kt_hi), in_lo)
            for kt in range(in_lo, in_hi):
                acc, m_i, l_i = _tile(
                    acc, m_i, l_i, q, kt, lo, hi, p, row_ok, 0, 0, 0, K, V, BLOCK_TABLE, LAYOUT, PIDX, PMASK, s, ks,
                    hk, d, dv, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sbt_s, sbt_b, Tk, D, DV, NB, BS,
                    MAXB, scale2, cap2, inv_cap, left, right, bq, bk, nqb, nkb, n_pm, lay_sh,
                    SOFTCAP=SOFTCAP, PAGED=PAGED, HAS_MASK=False, EDGE=False, BLOCK_N=BLOCK_N)
            for i in range(kt_lo, kt_hi - (in_hi - in_lo)):
                kt = tl.where(i < in_lo, i, i + in_hi - in_lo)
                acc, m_i, l_i = _tile(
                    acc, m_i, l_i, q, kt, lo, hi, p, row_ok, 0, 0, 0, K, V, BLOCK_TABLE, LAYOUT, PIDX, PMASK, s, ks,
                    hk, d, dv, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sbt_s, sbt_b, Tk, D, DV, NB, BS,
                    MAXB, scale2, cap2, inv_cap, left, right, bq, bk, nqb, nkb, n_pm, lay_sh,
                    SOFTCAP=SOFTCAP, PAGED=PAGED, HAS_MASK=False, EDGE=True, BLOCK_N=BLOCK_N)
            if COUNT:
                count = kt_hi - kt_lo
                edges = count - (in_hi - in_lo)

        if HAS_SINKS:  # one more logit in the denominator only
            sink = tl.load(SINKS + h, mask=hh < HEADS, other=float("-inf")).to(tl.float32)
            sink = sink * 1.4426950408889634  # log2(e): base-2 units like the scores
            m_new = tl.maximum(m_i, sink)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.exp2(sink - m_use)
            acc = acc * alpha[:, None]
            m_i = m_new
        seen = l_i > 0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(O + row[:, None] * so_t + h[:, None].to(tl.int64) * so_h + dv[None, :] * so_d,
                 o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
        if STORE_LSE:
            lse = (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453  # ln(2): back to base e
            lse = tl.where(seen, lse, float("-inf"))
            tl.store(LSE + h.to(tl.int64) * sl_h + row * sl_t, lse, mask=row_ok)
    if COUNT:
        slot = (pid * tl.num_programs(1) + hg) * 3
        tl.store(VISITS + slot, count)
        tl.store(VISITS + slot + 1, masked)
        tl.store(VISITS + slot + 2, edges)


def _cover(n: int, tile: int, block: int, nblocks: int, device):
    """Tiles of `tile` positions over blocks of `block`: per tile the indices of the blocks it covers
    ([n, R], repeated at the end) and whether it lies wholly inside the `nblocks` blocks."""
    tiles = torch.arange(n, device=device)
    first = tiles * tile // block
    last = torch.clamp(((tiles + 1) * tile - 1) // block, max=max(nblocks - 1, 0))
    cover = torch.minimum(first[:, None] + torch.arange(triton.cdiv(tile, block) + 1, device=device), last[:, None])
    return cover, (tiles + 1) * tile <= nblocks * block  # a tile reaching past the layout sees nothing there


def mask_tables(bm, rows: int, block_n: int, heads: int):
    """Per (sequence|1, head pack|1, row of `rows` query positions, key tile of block_n keys): the tile
    state (EMPTY/PARTIAL/FULL over every mask block it covers and the packed heads), the count of
    non-empty key tiles before each one, and the non-empty key tiles in order. A row is one mask query
    block (rows == bq) or one query tile. Built with device ops (no sync) where the mask lives.
    Returns (state, count, order, number of rows, number of key tiles)."""
    lay = bm.layout
    bq, bk = bm.block_size
    ns, nh, nqb, nkb = lay.shape
    dev = lay.device
    ne, fu = lay != EMPTY, lay == FULL
    if nh > 1 and heads > 1:  # a tile packs `heads` query heads: it is as visible as their union
        ne = ne.view(ns, nh // heads, heads, nqb, nkb).any(2)
        fu = fu.view(ns, nh // heads, heads, nqb, nkb).all(2)
    nkt = triton.cdiv(nkb * bk, block_n)
    nrows = nqb if rows == bq else triton.cdiv(nqb * bq, rows)
    if nkb and nkt and nrows:
        cover, whole = _cover(nkt, block_n, bk, nkb, dev)
        ne, fu = ne[..., cover].any(-1), fu[..., cover].all(-1) & whole  # [.., nqb, nkt]
        if rows != bq:
            cover, whole = _cover(nrows, rows, bq, nqb, dev)
            ne = ne[..., cover, :].any(-2)
            fu = fu[..., cover, :].all(-2) & whole[:, None]
    else:
        ne = fu = torch.zeros(ne.shape[:2] + (nrows, nkt), dtype=torch.bool, device=dev)
    # all three [S|1, packs|1, nrows, nkt + 1] (state and order padded by one column)
    pad = torch.zeros(ne.shape[:3] + (1,), dtype=torch.int32, device=dev)
    state = torch.cat([torch.where(fu, FULL, torch.where(ne, PARTIAL, EMPTY)).to(torch.int32), pad], -1)
    order = torch.cat([torch.argsort((~ne).to(torch.int8), dim=-1, stable=True).to(torch.int32), pad], -1)
    count = torch.cat([pad, ne.to(torch.int32).cumsum(-1).to(torch.int32)], dim=-1)
    if state.numel() == 0:  # an empty layout: the kernel reads nothing, but wants real pointers
        state = order = count = torch.zeros(1, dtype=torch.int32, device=dev)
    return state.to(torch.int8).contiguous(), count.contiguous(), order.contiguous(), nrows, nkt


def _kv_args(k, v, block_table) -> dict:
    """The flash kernel's key/value keyword arguments: strides of k, v [Tk, Hkv, D] (block stride 0), or of
    the caches [NB, BS, Hkv, D] and the block table (PAGED), and the sizes Tk, NB, BS, MAXB."""
    if block_table is None:
        return dict(sk_b=0, sk_t=k.stride(0), sk_h=k.stride(1), sk_d=k.stride(2), sv_b=0, sv_t=v.stride(0),
                    sv_h=v.stride(1), sv_d=v.stride(2), sbt_s=0, sbt_b=0, Tk=k.shape[0], NB=1, BS=1, MAXB=1)
    nb, bs = k.shape[:2]
    if bs == 0:  # a cache without slots: every key is masked (and no division by zero)
        nb, bs = 0, 1
    return dict(sk_b=k.stride(0), sk_t=k.stride(1), sk_h=k.stride(2), sk_d=k.stride(3), sv_b=v.stride(0),
                sv_t=v.stride(1), sv_h=v.stride(2), sv_d=v.stride(3), sbt_s=block_table.stride(0),
                sbt_b=block_table.stride(1), Tk=0, NB=nb, BS=bs, MAXB=block_table.shape[1])


def _mask_args(block_mask, tiles, device) -> dict:
    """The flash kernel's block-mask keyword arguments: the mask's tensors and the tables of `mask_tables`
    (None without a mask), their sizes and strides, and the HAS_MASK, MASK_SEQS, MASK_HEADS constexprs."""
    if block_mask is None:
        return dict(LAYOUT=None, PIDX=None, PMASK=None, TSTATE=None, TCUM=None, TIDX=None, bq=1, bk=1, nqb=1, nkb=1,
                    rq=1, nrows=1, nkt=1, n_pm=1, lay_ss=0, lay_sh=0, tab_ss=0, tab_sh=0, HAS_MASK=False,
                    MASK_SEQS=False, MASK_HEADS=False)
    bq, bk = block_mask.block_size
    ns, nh, nqb, nkb = block_mask.layout.shape
    tstate, tcount, tidx, nrows, nkt = mask_tables(block_mask, tiles.mask_rows, tiles.block_n, tiles.heads)
    layout = block_mask.layout.contiguous()
    pidx = block_mask.partial_index.contiguous()
    pmask = block_mask.partial_masks.contiguous().view(torch.uint8)
    n_pm = pmask.shape[0]
    if n_pm == 0:  # keep every (masked) gather address inside a real tensor
        pmask = torch.zeros((1, bq, bk), dtype=torch.uint8, device=device)
    if layout.numel() == 0:
        layout = torch.zeros(1, dtype=torch.int8, device=device)
        pidx = torch.full((1,), -1, dtype=torch.int32, device=device)
    packs = nh // tiles.heads if nh > 1 else 1
    return dict(LAYOUT=layout, PIDX=pidx, PMASK=pmask, TSTATE=tstate, TCUM=tcount, TIDX=tidx, bq=bq, bk=bk,
                nqb=nqb, nkb=nkb, rq=tiles.mask_rows, nrows=nrows, nkt=nkt, n_pm=max(n_pm, 1),
                lay_ss=nh * nqb * nkb, lay_sh=nqb * nkb, tab_ss=packs * nrows * (nkt + 1), tab_sh=nrows * (nkt + 1),
                HAS_MASK=True, MASK_SEQS=ns > 1, MASK_HEADS=nh > 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward(q, k, v, o, lse, *, cu_q=None, cu_k=None, seqused=None, block_table=None, max_q: int,
            causal: bool, window, softcap: float, sinks, scale: float, block_mask, visits=None):
    """Launch the kernel. q [Tq, Hq, D]; k, v [Tk, Hkv, D|Dv] or caches [NB, BS, Hkv, D|Dv] (with
    block_table and seqused); cu_q (and cu_k, not paged) None for one sequence; o [Tq, Hq, Dv] and
    lse [Hq, Tq] (or None) are written. Returns the grid (None when there is nothing to compute).
    `visits` (int32, at least 3 x grid size), when given, receives per program the key tiles it
    visited, how many of them took a block mask's element mask and how many were edge tiles (a test hook)."""
    cu_q, cu_k, seqused, sinks = dense(cu_q, cu_k, seqused, sinks)  # read by bare offsets
    tq, hq, d = q.shape
    hkv, dv = k.shape[-2], v.shape[-1]
    nseq = 1 if cu_q is None else cu_q.shape[0] - 1
    if tq == 0 or nseq == 0 or hq == 0:
        return None
    group = hq // hkv
    tiles = flash_tiles(q, group=group, max_q=max_q, head_dim=d, head_dim_v=dv,
                        mask_block=None if block_mask is None else block_mask.block_size)
    n_m = _cdiv(max(max_q, 1), tiles.block_q) + (1 if block_mask is not None else 0)
    grid = (nseq * n_m, hq // tiles.heads)

    left, right = window
    left = BIG if left < 0 else min(left, BIG)  # a side wider than any sequence is no bound
    right = BIG if right < 0 else min(right, BIG)
    if causal:
        right = min(right, 0)
    scale2 = scale * LOG2E
    cap2 = softcap * LOG2E if softcap > 0 else 0.0
    inv_cap = scale / softcap if softcap > 0 else 0.0

    _flash_fwd[grid](
        Q=q, K=k, V=v, O=o, LSE=lse, SINKS=sinks, CU_Q=cu_q, CU_K=cu_k, SEQUSED=seqused, BLOCK_TABLE=block_table,
        VISITS=visits,
        sq_t=q.stride(0), sq_h=q.stride(1), sq_d=q.stride(2), so_t=o.stride(0), so_h=o.stride(1), so_d=o.stride(2),
        sl_h=stride(lse, 0), sl_t=stride(lse, 1),
        Tq=tq, Hq=hq, D=d, DV=dv, n_m=n_m, scale2=scale2, cap2=cap2, inv_cap=inv_cap, left=left, right=right,
        **_kv_args(k, v, block_table), **_mask_args(block_mask, tiles, q.device),
        GROUP=group, HEADS=tiles.heads,
        VARLEN=cu_q is not None, SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None, PAGED=block_table is not None,
        STORE_LSE=lse is not None, COUNT=visits is not None,
        BLOCK_Q=tiles.block_q, BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n,
        BLOCK_D=tiles.block_d, BLOCK_DV=tiles.block_dv,
        **tiles.launch,
    )
    return grid


def max_seqlen(cu: torch.Tensor) -> int:
    """The longest sequence of cu_seqlens (a device-to-host sync: callers pass a hint when they can)."""
    return int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0

