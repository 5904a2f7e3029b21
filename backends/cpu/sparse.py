"""sparse_attention on the CPU: each query's listed keys gathered per kv head, chunks of queries as the
batch of one kernel call each: O(Tq * topk * D) work, memory bounded by GATHER_BUDGET."""
from __future__ import annotations

import torch

from .tiles import attend, clear, store

GATHER_BUDGET = 1 << 24  # bytes of gathered keys and values per chunk of queries (16 MiB: measured best)


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, out=None):
    tq, hq, _ = q.shape
    hkv = indices.shape[1]
    topk = indices.shape[2] if k.shape[0] else 0  # no keys at all: nothing can be listed
    o = out if out is not None else q.new_empty(tq, hq, v.shape[2])
    lse = torch.empty(hq, tq, dtype=torch.float32) if return_lse else None
    start = torch.zeros(tq, dtype=torch.long)  # first key row of each query's sequence
    if cu_seqlens_q is not None:
        start = torch.repeat_interleave(cu_seqlens_k[:-1].long(), (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(),
                                        output_size=tq)
    heads = torch.arange(hkv)[None, :, None]
    step = max(1, GATHER_BUDGET // max(1, hkv * topk * (k.shape[2] + v.shape[2]) * k.element_size()))
    for t0 in range(0, tq, step):
        idx = indices[t0:t0 + step, :, :topk].long()  # [C, Hkv, topk], -1 = unused
        rows = (idx.clamp(min=0) + start[t0:t0 + step, None, None]).clamp(max=k.shape[0] - 1)
        kt, vt = k[rows, heads], v[rows, heads]                  # [C, Hkv, topk, D]
        dead, vis = idx < 0, None
        if bool(dead.any()):  # a -1 slot read a clamped row, which may hold NaN
            kt, vt = clear(dead, kt, vt)
            vis = (~dead).repeat_interleave(hq // hkv, dim=1)[:, :, None]  # [C, Hq, 1, topk]
        ot, lt = attend(q[t0:t0 + step, :, None], kt, vt, vis, softmax_scale, softcap)
        store(o, lse, t0, ot, lt, sinks)  # C tiles of one row
    return (o, lse) if return_lse else o
