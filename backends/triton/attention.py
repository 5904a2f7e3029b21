"""attention: packed varlen batches through the shared flash forward kernel (flash.py)."""
from __future__ import annotations

import torch

from . import flash


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None):
    tq, hq = q.shape[:2]
    o = out if out is not None else q.new_empty(tq, hq, v.shape[2])
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device) if return_lse else None
    if cu_seqlens_q is None:  # one sequence
        max_q = tq
    else:
        max_q = max_seqlen_q if max_seqlen_q is not None else flash.max_seqlen(cu_seqlens_q)
    flash.forward(q, k, v, o, lse, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_q, causal=causal,
                  window=window_size, softcap=softcap, sinks=sinks, scale=softmax_scale, block_mask=block_mask)
    return (o, lse) if return_lse else o
