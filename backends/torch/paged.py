"""paged_attention through SDPA's kernels: each sequence's pages gathered into contiguous keys, then
attention's sequence path; decode (one query per sequence, no block mask) as one batched call over
keys padded to the longest sequence, the padding masked and zeroed."""
from __future__ import annotations

import torch

from .attention import sequence, store
from .bands import bounds
from .sdpa import attend


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    o = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    used = seqused_k.tolist()  # one host sync
    if cu_seqlens_q is None and block_mask is None:
        _decode(q, k_cache, v_cache, block_table, used, o, lse, window_size[0], softmax_scale, sinks)
    else:
        rows = bounds(cu_seqlens_q, q.shape[0]) if cu_seqlens_q is not None else [(s, s + 1) for s in range(len(used))]
        for s, (qs, qe) in enumerate(rows):
            k, v = (gather(c, block_table[s:s + 1], used[s])[0] for c in (k_cache, v_cache))
            sequence(q[qs:qe], k, v, o[qs:qe], None if lse is None else lse[:, qs:qe], s=s, causal=causal,
                     window=window_size, scale=softmax_scale, block_mask=block_mask, sinks=sinks)
    return (o, lse) if return_lse else o


def gather(cache, table, n: int):
    """The first n keys of each row of table [B, blocks] out of cache [NB, BS, H, D]: [B, n, H, D].
    Table entries past a sequence's blocks may hold anything: they are clamped, their keys masked."""
    ids = table[:, :-(-n // cache.shape[1])].long().clamp(0, cache.shape[0] - 1)
    return cache[ids].flatten(1, 2)[:, :n]


def _decode(q, k_cache, v_cache, block_table, used, o, lse, left: int, scale: float, sinks) -> None:
    """One query per sequence s, at position used[s] - 1: keys [used[s] - 1 - left, used[s]) (left -1: all)."""
    n = max(used, default=0)
    k, v = (gather(c, block_table, n) for c in (k_cache, v_cache))  # [S, n, Hkv, D]
    lens = torch.tensor(used, device=q.device)
    j = torch.arange(n, device=q.device)
    vis = j[None, :] < lens[:, None]  # [S, n]
    if left >= 0:
        vis &= j[None, :] >= lens[:, None] - 1 - left
    mask = None
    if not bool(vis.all()):
        k, v = (x.masked_fill(~vis[:, :, None, None], 0) for x in (k, v))  # stale slots may hold NaN
        mask = vis[:, None, None]  # [S, 1, 1, n]
    qh = (q if q.stride(-1) == 1 else q.contiguous())[:, :, None]  # [S, Hq, 1, D]
    ot, lt = attend(qh, k.transpose(1, 2), v.transpose(1, 2), mask=mask, causal=False, scale=scale,
                    lse=lse is not None or sinks is not None)  # [S, Hq, 1, Dv], [S, Hq, 1]
    empty = (lens == 0)[None]  # [1, S]: sequences with no keys
    store(ot[:, :, 0].transpose(0, 1), None if lt is None else lt[:, :, 0].t(), empty, sinks, o, lse)
