"""attention on the CPU: prefill by the compiled flash kernel (flash.cpp: the key blocks of each query block's
causal/window band that its block mask leaves visible); else (and where the kernel is not built) per sequence,
tiles of queries over only the keys their causal/window band and block mask leave visible, one call of torch's
fused flash-attention kernel per tile (or per run of identical tiles).
A sliding window of W costs O(T*W); nothing of size T x T is ever built."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import blockvis, native
from .tiles import (add_sinks, attend, band_vis, block_keys, bounds, clear, flash, heads_first, lse_rows, merge,
                    store, unit, unseen)
from .workspace import buffer

TILE = 256      # query rows per tile (x the GQA group once packed): measured on a 2-core AVX-512 host,
MIN_TILE = 64   # fp32 flat over 64..256, bf16 best at 256; a narrower window gets tiles about its width
FEW_QUERIES = 16  # up to this many queries (decode, speculative decode): one kernel call on views, no copies


class Options(NamedTuple):
    causal: bool
    window: tuple[int, int]
    softcap: float
    sinks: torch.Tensor | None
    scale: float
    block_mask: object


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None):
    decode = block_mask is None and one_query_each(q, cu_seqlens_q, max_seqlen_q)
    if decode:  # the compiled kernel (any strides)
        done = native.decode(q, k, v, sinks, softmax_scale, window_size[0], softcap, return_lse, out,
                             cu_seqlens_k=cu_seqlens_k)
        if done is not None:
            return done
    k, v = unit(k), unit(v)  # once here, rather than per (overlapping) tile view
    opts = Options(causal, window_size, softcap, sinks, softmax_scale, block_mask)
    if (decode and cu_seqlens_q is None and out is None and softcap == 0
            and not 0 <= window_size[0] < k.shape[0] - 1):  # no compiled kernel: one query that sees every key
        return _one_query(q, k, v, softmax_scale, sinks, return_lse)
    if q.shape[0] > FEW_QUERIES:  # prefill: the compiled flash kernel
        done = native.flash(q, k, v, opts, return_lse, out, cu_seqlens_q, cu_seqlens_k)
        if done is not None:
            return done
    o = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32) if return_lse else None
    if cu_seqlens_q is None and cu_seqlens_k is None:  # one sequence: no slicing (decode-sized calls count us)
        sequence(opts, 0, q, k, v, 0, k.shape[0], o, lse)
        return (o, lse) if return_lse else o
    seqs = list(zip(bounds(cu_seqlens_q, q.shape[0]), bounds(cu_seqlens_k, k.shape[0])))
    if _batched(opts, seqs):
        _uniform(opts, q, k, v, len(seqs), o, lse)
        return (o, lse) if return_lse else o
    for s, ((qs, qe), (ks, ke)) in enumerate(seqs):
        sequence(opts, s, q[qs:qe], k[ks:ke], v[ks:ke], 0, ke - ks, o[qs:qe], lse_rows(lse, qs, qe))
    return (o, lse) if return_lse else o


def one_query_each(q, cu_seqlens_q, max_seqlen_q) -> bool:
    """Whether every sequence has exactly one query (at its last key's position, causal or not); without
    cu_seqlens_q, whether q holds one."""
    if cu_seqlens_q is None:
        return q.shape[0] == 1
    return q.shape[0] == cu_seqlens_q.shape[0] - 1 and (max_seqlen_q == 1 or bool((cu_seqlens_q.diff() == 1).all()))


def binding_window(opts: Options, lq: int, lk: int) -> tuple[int, int]:
    """The window with each side that hides nothing in this sequence set to -1."""
    left, right = opts.window
    left = -1 if left >= lk - 1 else left
    right = -1 if opts.causal or right >= lq - 1 else right  # causal already hides more than any right side
    return left, right


def first_key(opts: Options, lq: int, lk: int) -> int:
    """The lowest key position any query of the sequence can see."""
    left = binding_window(opts, lq, lk)[0]
    return max(0, lk - lq - left) if left >= 0 else 0


def sequence(opts: Options, s: int, q, k, v, k0: int, lk: int, o, lse) -> None:
    """Sequence s: q [Lq, Hq, D] against k, v [lk - k0, Hkv, D|Dv], its keys from position k0 on (k0 at
    most the first position a query can see); writes o [Lq, Hq, Dv] and lse [Hq, Lq] (unless None)."""
    window = binding_window(opts, q.shape[0], lk)
    if window == (-1, -1) and opts.block_mask is None and opts.softcap == 0:
        _whole(opts, q, k, v, lk - q.shape[0], o, lse)
    else:
        _tiled(opts, s, q, k, v, k0, lk, window, o, lse)


def _whole(opts, q, k, v, off, o, lse):
    """No window, mask or softcap: the kernel over the whole sequence, its own causal skipping included."""
    if q.shape[0] <= FEW_QUERIES:
        _uniform(opts, q, k, v, 1, o, lse)
        return
    # [1, H, L, D], copied head-major (~6% faster than token-major views over a whole sequence) into kept
    # buffers (fresh ones cost their page faults, ~5% of a dense causal call)
    qh, kh, vh = (buffer(f"whole.{n}", (x.shape[1], x.shape[0], x.shape[2]), x.dtype).copy_(x.transpose(0, 1))[None]
                  for n, x in (("q", q), ("k", k), ("v", v)))
    if not opts.causal:
        store(o, lse, 0, *attend(qh, kh, vh, None, opts.scale, 0.0), opts.sinks)
        return
    # query t sits at position t + off: queries before the first key see nothing, keys before the
    # first query's position are seen by all, and the rest is a square the kernel masks top-left
    r0, c0 = max(0, -off), max(0, off)
    ot, lt = attend(qh[:, :, r0:], kh[:, :, c0:], vh[:, :, c0:], None, opts.scale, 0.0, causal=True)
    if c0 > 0:
        ot, lt = merge(ot, lt, *attend(qh, kh[:, :, :c0], vh[:, :, :c0], None, opts.scale, 0.0))
    store(o, lse, r0, ot, lt, opts.sinks)
    if r0:
        store(o, lse, 0, *attend(qh[:, :, :r0], kh[:, :, :0], vh[:, :, :0], None, opts.scale, 0.0), opts.sinks)


def _batched(opts: Options, seqs) -> bool:
    """Sequences of one query count and one key count (a padded batch, packed) that one kernel call over
    [S, H, L, D] views computes: no window, mask or softcap, and a causal band the kernel or a bias draws."""
    if len(seqs) < 2:
        return False
    (qs, qe), (ks, ke) = seqs[0]
    lq, lk = qe - qs, ke - ks
    if lk == 0 or any(e - s != lq or f - t != lk for (s, e), (t, f) in seqs):
        return False
    return (binding_window(opts, lq, lk) == (-1, -1) and opts.block_mask is None and opts.softcap == 0
            and (not opts.causal or lq == lk or lq <= min(FEW_QUERIES, lk)))


def _uniform(opts, q, k, v, n, o, lse):
    """n sequences alike (`_batched`; or one of a few queries): one kernel call on token-major views, the
    causal band the kernel's own when queries and keys align, else (a few queries, bottom-right aligned) a
    bias; every key is seen by the last query, so no key needs clearing."""
    lq, lk = q.shape[0] // n, k.shape[0] // n
    qh, kh, vh = (heads_first(x, n) for x in (q, k, v))  # [n, H, L, D] views
    causal, band = opts.causal and lq > 1 and lq == lk, opts.causal and lq > 1 and lq != lk  # one query sees all
    vis = band_vis(torch.arange(lk - lq, lk), torch.arange(lk), True, (-1, -1)) if band else None
    store(o, lse, 0, *attend(qh, kh, vh, None if vis is None else vis[None], opts.scale, 0.0, causal=causal),
          opts.sinks)


def _one_query(q, k, v, scale, sinks, return_lse):
    """Decode: q [1, Hq, D] over every key, one flash-kernel call on views whose result is the output itself
    (o [1, Hq, Dv] and lse [Hq, 1] are views of the kernel's [1, Hkv, g, Dv] and [1, Hkv, g])."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[0] and v.shape[2] == d:  # the common case in as few torch calls as it takes
        # the g query heads of a kv head as the g query rows of one head: [1, Hkv, g, D]
        ot, lt = flash(unit(q).reshape(1, hkv, hq // hkv, d), heads_first(k), heads_first(v), 0.0, False,
                        scale=scale)
    else:  # no keys, or Dv != D: attend's general path
        ot, lt = attend(heads_first(q), heads_first(k), heads_first(v), None, scale, 0.0)
    if sinks is not None:
        ot, lt = add_sinks(ot.reshape(1, hq, 1, -1), lt.reshape(1, hq, 1), sinks)
        ot = ot.to(q.dtype)  # the sinks' weights are float32
    o = ot.view(1, hq, ot.shape[-1]).contiguous()  # Dv < D: a slice of the padded kernel output
    return (o, lt.reshape(hq, 1)) if return_lse else o


def _tiled(opts, s, q, k, v, k0, lk, window, o, lse):
    """Query tiles, each over the keys its band (and block mask rows) can see, masked inside the tile."""
    lq, hq, d = q.shape
    off, bm = lk - lq, opts.block_mask
    if bm is not None:  # tiles of whole mask rows, so that a tile computes the key blocks of its rows only
        tile = bm.block_size[0] * max(1, MIN_TILE // bm.block_size[0])
    elif window[0] >= 0:  # about as wide as the window: work <= 2x the visible pairs
        tile = min(TILE, max(MIN_TILE, window[0] + max(window[1], 0) + 1))
    else:
        tile = TILE
    table = None if bm is None else blockvis.table(bm)
    for t0, n, r, lo, hi in _tiles(lq, lk, opts.causal, window, tile, grouped=bm is None):
        p = torch.arange(t0, t0 + r) + off  # positions of the first tile's queries
        j = torch.arange(lo, hi) if bm is None else block_keys(bm, s, p, lo, hi)
        vis = band_vis(p, j, opts.causal, window)
        blocks = None if bm is None else blockvis.visible(bm, table, s, t0 + off, t0 + off + r, j)  # [Hm, r, K]
        if blocks is not None:
            vis = blocks if vis is None else blocks & vis
        vis = None if vis is None else vis[None]
        dead = None if vis is None or bm is None else unseen(vis, k.shape[1])  # a band tile's keys are all seen
        if j.numel() == hi - lo and dead is None:  # keys contiguous: tile i sees keys [lo + i*r, hi + i*r), views only
            kt, vt = (_windows(x, lo - k0, n, hi - lo, r) for x in (k, v))
        else:
            kt, vt = (x.index_select(0, j - k0)[None] for x in (k, v))  # [1, K, Hkv, D]
            if dead is not None:
                kt, vt = clear(dead, kt, vt)
            kt, vt = kt.transpose(1, 2), vt.transpose(1, 2)
        qt = q[t0:t0 + n * r].view(n, r, hq, d).transpose(1, 2)  # [n, Hq, r, D]
        store(o, lse, t0, *attend(qt, kt, vt, vis, opts.scale, opts.softcap), opts.sinks)


def _tiles(lq: int, lk: int, causal: bool, window, tile: int, grouped: bool):
    """(t0, n, r, lo, hi): n query tiles of r rows from t0, tile i seeing keys [lo + i*r, hi + i*r) at most.
    Tiles start at positions that are multiples of `tile`. With `grouped`, consecutive tiles alike up
    to that shift share one entry (one kernel call)."""
    left, right = window
    off, tiles = lk - lq, []
    for t0 in sorted({0} | set(range(-off % tile, lq, tile))):
        r = min(lq, t0 + tile - (t0 + off) % tile) - t0
        p0, p1 = t0 + off, t0 + r + off
        lo = max(0, p0 - left) if left >= 0 else 0
        hi = min(lk, p1 if causal else lk, p1 + right if right >= 0 else lk)
        hi = max(lo, hi)
        if grouped and tiles:
            g0, n, gr, glo, ghi = tiles[-1]
            if r == gr and lo == glo + n * gr and hi == ghi + n * gr:
                tiles[-1] = (g0, n + 1, gr, glo, ghi)
                continue
        tiles.append((t0, 1, r, lo, hi))
    return tiles


def _windows(x, start: int, n: int, length: int, step: int):
    """x [N, H, D] -> the view [n, H, length, D] whose item i is rows start + i*step .. + length."""
    s0, s1, s2 = x.stride()
    return x.as_strided((n, x.shape[1], length, x.shape[2]), (step * s0, s1, s0, s2),
                        x.storage_offset() + start * s0)
