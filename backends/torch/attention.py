"""attention through SDPA's kernels, sequence by sequence: the rows that see some key and the keys some
row sees (a causal band, a window), with a mask only where something inside that rectangle is hidden.

Nothing outside the rectangle reaches the kernel, so keys no query sees may hold any bits (SPEC); a
block mask can hide keys inside it, which are zeroed first (a masked score still carries NaN: 0 * NaN)."""
from __future__ import annotations

import torch

from .bands import bounds, rect
from .sdpa import NEG, attend


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None):
    o = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    seqs = zip(bounds(cu_seqlens_q, q.shape[0]), bounds(cu_seqlens_k, k.shape[0]))
    for s, ((qs, qe), (ks, ke)) in enumerate(seqs):
        sequence(q[qs:qe], k[ks:ke], v[ks:ke], o[qs:qe], None if lse is None else lse[:, qs:qe], s=s, causal=causal,
                 window=window_size, scale=softmax_scale, block_mask=block_mask, sinks=sinks)
    return (o, lse) if return_lse else o


def sequence(q, k, v, o, lse, *, s: int, causal: bool, window, scale: float, block_mask, sinks) -> None:
    """One sequence: q [Lq, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv] -> o [Lq, Hq, Dv] and lse [Hq, Lq]
    (None: not wanted) written in place."""
    lq, lk = q.shape[0], k.shape[0]
    r = rect(lq, lk, causal, window)
    for rows in (slice(0, r.r0), slice(r.r1, lq)):  # rows that see nothing
        o[rows].zero_()
        if lse is not None:
            lse[:, rows] = NEG if sinks is None else sinks[:, None].float()
    if r.r0 == r.r1:
        return
    q, k, v = q[r.r0:r.r1], k[r.k0:r.k1], v[r.k0:r.k1]
    mask, empty = None, None
    top_left = r.top_left and scale != 0  # the kernel's own causal mask gives NaN at scale 0
    if block_mask is not None or (r.masked and not top_left):
        p = torch.arange(r.r0, r.r1, device=q.device) + (lk - lq)
        j = torch.arange(r.k0, r.k1, device=q.device)
        mask = band(p, j, causal, window)[None]  # [1, R, K]
        if block_mask is not None:
            mask = mask & block_mask.visible(s, p, j)  # [Hm, R, K]
            k, v = clear_unseen(mask, k, v)
            empty = ~mask.any(-1)  # [Hm, R]: rows the block mask leaves nothing
        top_left = False
    ot, lt = attend(heads_first(q), heads_first(k), heads_first(v), mask=None if mask is None else mask[None],
                    causal=top_left, scale=scale, lse=lse is not None or sinks is not None)
    store(ot[0], None if lt is None else lt[0], empty, sinks, o[r.r0:r.r1], None if lse is None else lse[:, r.r0:r.r1])


def store(ot, lt, empty, sinks, o, lse) -> None:
    """Write ot [Hq, R, Dv] and lt [Hq, R] (None when neither lse nor sinks are wanted) to o [R, Hq, Dv] and
    lse [Hq, R] (None: not wanted): rows in `empty` [Hm, R] (None: none) get o = 0, lse = -inf; the sink
    logits sinks [Hq] join the denominator."""
    if empty is not None:
        ot = ot.masked_fill(empty[..., None], 0)
        lt = None if lt is None else lt.masked_fill(empty, NEG)
    if sinks is not None:
        total = torch.logaddexp(lt, sinks.float()[:, None])
        ot = ot * torch.where(total > NEG, torch.exp(lt - total), 0.0)[..., None].to(ot.dtype)
        lt = total
    o.copy_(ot.transpose(0, 1))
    if lse is not None:
        lse.copy_(lt)


def band(p, j, causal: bool, window) -> torch.Tensor:
    """bool [len(p), len(j)]: key position j visible from query position p under causal and window."""
    left, right = window
    diff = j[None, :] - p[:, None]
    vis = diff <= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if left >= 0:
        vis &= diff >= -left
    if right >= 0:
        vis &= diff <= right
    return vis


def clear_unseen(mask, k, v):
    """k, v [K, Hkv, D|Dv] with the keys no row of mask [Hm, R, K] shows to any query head of their kv
    head set to zero (copies, only when there are such keys)."""
    seen = mask.any(1)  # [Hm, K]
    if seen.shape[0] > 1:
        seen = seen.view(k.shape[1], -1, seen.shape[-1]).any(1)  # [Hkv, K]
    if bool(seen.all()):
        return k, v
    dead = ~seen.t()[..., None]  # [K, Hkv|1, 1]
    return k.masked_fill(dead, 0), v.masked_fill(dead, 0)


def heads_first(x):
    """[L, H, D] -> the view [1, H, L, D], copied when its last axis is strided (the CPU kernel misreads it)."""
    return (x if x.stride(-1) == 1 else x.contiguous()).transpose(0, 1)[None]
