"""The flash kernel's work list, built with jnp (so it traces under jax.jit): query tiles aligned to
positions, and per query tile the key tiles it must visit (the others are never fetched).

A sequence with `lq` queries and `lk` keys holds positions `[lk - lq, lk)` (bottom-right alignment);
query tile `i` covers positions `[i * bq, (i + 1) * bq)` and key tile `j` keys `[j * bk, (j + 1) * bk)`.
Tiles aligned to positions lie inside one block of a block mask whose block sizes they divide, so
one layout entry decides a whole tile pair: EMPTY pairs are dropped, FULL pairs need no element mask
and PARTIAL pairs read one tile of the element mask.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL = 0, 1


@dataclasses.dataclass(frozen=True)
class Mask:
    """A BlockMask as the kernel reads it: layout and partial tiles re-cut to the kernel's tiles."""
    block: tuple[int, int]        # the mask's (bq, bk)
    layout: jnp.ndarray           # int32 [S|1, H|1, nqb, nkb]
    partial_index: jnp.ndarray    # int32, like layout
    tiles: jnp.ndarray            # int32 [M * (bq_m // bq) * (bk_m // bk) (at least 1), bq, bk]

    @property
    def heads(self) -> int:
        return self.layout.shape[1]


def mask_for(block_mask, bq: int, bk: int) -> Mask:
    """Host copy of a portable_attn.BlockMask (torch, on the CPU), its partial masks cut into tiles."""
    bq_m, bk_m = block_mask.block_size
    pm = block_mask.partial_masks.cpu().numpy()
    m = pm.shape[0]
    tiles = pm.reshape(m, bq_m // bq, bq, bk_m // bk, bk).transpose(0, 1, 3, 2, 4).reshape(-1, bq, bk)
    if tiles.shape[0] == 0:
        tiles = np.zeros((1, bq, bk), bool)
    return Mask((bq_m, bk_m), jnp.asarray(block_mask.layout.cpu().numpy().astype(np.int32)),
                jnp.asarray(block_mask.partial_index.cpu().numpy()), jnp.asarray(tiles.astype(np.int32)))


def _first_last(lq, lk, bq):
    first = jnp.floor_divide(lk - lq, bq)
    last = jnp.floor_divide(lk - 1, bq)
    ntile = jnp.where(lq > 0, last - first + 1, 0)
    return first, ntile


def query_bound(tq: int, nseq: int, bq: int) -> int:
    """The most query tiles `nseq` sequences of `tq` queries in all can need. Lq >= 1 queries at any offset touch
    at most floor((Lq - 1) / bq) + 2 tiles, and every tile holds a query: summed over the m = min(nseq, tq)
    sequences that can hold one, at most min(tq, floor((tq - m) / bq) + 2m)."""
    m = min(nseq, tq)
    return min(tq, (tq - m) // bq + 2 * m)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Work:
    seq: jnp.ndarray      # int32 [NQT]: the sequence of each query tile (0 for unused tiles)
    p0: jnp.ndarray       # int32 [NQT]: first position of the tile
    lo: jnp.ndarray       # int32 [NQT]: first query position of its sequence (lk - lq)
    hi: jnp.ndarray       # int32 [NQT]: key count of its sequence (lk); unused tiles: lo > hi
    count: jnp.ndarray    # int32 [Hm * NQT]: key tiles to visit
    kv_j: jnp.ndarray     # int32 [Hm * NQT, NK]: key tile numbers in visiting order (tail: the last one)
    part: jnp.ndarray     # int32 [Hm * NQT, NK]: partial-mask tile of the pair, -1 if none
    starts: jnp.ndarray   # int32 [S]: first query tile of each sequence
    first: jnp.ndarray    # int32 [S]: position tile index of that first tile


def work(lq, lk, opts, *, bq: int, bk: int, nqt: int, nk: int, mask: Mask | None) -> Work:
    """The work list for sequences of `lq` queries and `lk` keys (int32 [S]), with `nqt` query tiles
    and `nk` candidate key tiles per query tile (static bounds); `opts` int32 [causal, left, right]."""
    nseq = lq.shape[0]
    first, ntile = _first_last(lq, lk, bq)
    ends = jnp.cumsum(ntile)
    starts = ends - ntile
    w = jnp.arange(nqt, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(ends, w, side="right"), 0, max(nseq - 1, 0)).astype(jnp.int32)
    used = w < (ends[-1] if nseq else 0)
    p0 = (first[seq] + w - starts[seq]) * bq
    lo = jnp.where(used, (lk - lq)[seq], 1)
    hi = jnp.where(used, lk[seq], 0)
    pa, pb = jnp.maximum(p0, lo), jnp.minimum(p0 + bq - 1, hi - 1)   # positions of the tile's queries
    k0 = jnp.arange(nk, dtype=jnp.int32)[None, :] * bk
    causal, left, right = opts[0] != 0, opts[1], opts[2]
    visit = ((pa <= pb)[:, None] & (k0 < hi[:, None])
             & (~causal | (k0 <= pb[:, None]))
             & ((left < 0) | (k0 + bk - 1 >= (pa - left)[:, None]))
             & ((right < 0) | (k0 <= (pb + right)[:, None])))[None]     # [Hm, NQT, NK]
    part = jnp.full(visit.shape, -1, jnp.int32)
    if mask is not None and 0 in mask.layout.shape[2:]:  # a layout over no positions: nothing is visible
        visit = jnp.zeros_like(visit)
    elif mask is not None:
        bq_m, bk_m = mask.block
        nqb, nkb = mask.layout.shape[2:]
        qb = jnp.floor_divide(p0, bq_m)
        kb = k0[0] // bk_m
        inside = ((qb >= 0) & (qb < nqb))[:, None] & (kb < nkb)[None, :]
        sm = seq if mask.layout.shape[0] > 1 else jnp.zeros_like(seq)
        at = (sm[None, :, None], jnp.arange(mask.heads)[:, None, None], jnp.clip(qb, 0, nqb - 1)[None, :, None],
              jnp.clip(kb, 0, nkb - 1)[None, None, :])
        state = jnp.where(inside[None], mask.layout[at], EMPTY)
        visit = visit & (state != EMPTY)
        sub = (jnp.mod(p0, bq_m) // bq)[:, None] * (bk_m // bk) + (jnp.mod(k0[0], bk_m) // bk)[None, :]
        part = jnp.where(state == PARTIAL, mask.partial_index[at] * ((bq_m // bq) * (bk_m // bk)) + sub[None], -1)
    hm = visit.shape[0]
    visit, part = visit.reshape(hm * nqt, nk), part.reshape(hm * nqt, nk)
    count = visit.sum(axis=1).astype(jnp.int32)
    order = jnp.argsort(~visit, axis=1, stable=True).astype(jnp.int32)   # visited tiles first, in order
    n = jnp.minimum(jnp.arange(nk)[None, :], jnp.maximum(count - 1, 0)[:, None])  # the tail repeats the last
    kv_j = jnp.take_along_axis(order, n, axis=1)
    return Work(seq, p0.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32), count, kv_j,
                jnp.take_along_axis(part, kv_j, axis=1), starts.astype(jnp.int32), first.astype(jnp.int32))


def query_rows(wk: Work, q_start, bq: int):
    """Packed query row of each row of each query tile (int32 [NQT * bq]), and whether it is one."""
    p = wk.p0[:, None] + jnp.arange(bq, dtype=jnp.int32)[None, :]
    ok = (p >= wk.lo[:, None]) & (p < wk.hi[:, None])
    rows = q_start[wk.seq][:, None] + p - wk.lo[:, None]
    return rows.reshape(-1), ok.reshape(-1)


def tile_rows(wk: Work, cu_q, lq, lk, bq: int, tq: int):
    """Row of the tiled output that holds each packed query (int32 [Tq])."""
    t = jnp.arange(tq, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(cu_q[1:], t, side="right"), 0, max(lq.shape[0] - 1, 0))
    p = t - cu_q[s] + (lk - lq)[s]
    i = jnp.floor_divide(p, bq)
    return (wk.starts[s] + i - wk.first[s]) * bq + (p - i * bq)
