"""paged_attention (decode without split-KV, and chunked prefill): the flash forward kernel of
attention reading K/V through the block table (its PAGED path), `Lk = seqused_k[s]`."""
from __future__ import annotations

import torch

from . import decode, flash


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    if cu_seqlens_q is None and block_mask is None and decode.splits_for(
            q, k_cache, block_table, window_size=window_size, max_seqlen_k=max_seqlen_k) > 1:
        # a small batch of long contexts: split-KV decode fills the GPU (decode.py)
        return decode.decode_split(q, k_cache, v_cache, block_table, seqused_k, window_size=window_size,
                                   softcap=softcap, sinks=sinks, softmax_scale=softmax_scale, out=out,
                                   return_lse=return_lse, max_seqlen_k=max_seqlen_k)
    tq, hq = q.shape[:2]
    o = out if out is not None else q.new_empty(tq, hq, v_cache.shape[3])
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device) if return_lse else None
    if cu_seqlens_q is None:  # decode: query i is sequence i's only one
        cu_q = torch.arange(block_table.shape[0] + 1, dtype=torch.int32, device=q.device)
        max_q = 1
    else:
        cu_q = cu_seqlens_q
        max_q = max_seqlen_q if max_seqlen_q is not None else flash.max_seqlen(cu_q)
    flash.forward(q, k_cache, v_cache, o, lse, cu_q=cu_q, seqused=seqused_k, block_table=block_table,
                  max_q=max_q, causal=causal, window=window_size, softcap=softcap, sinks=sinks,
                  scale=softmax_scale, block_mask=block_mask)
    return (o, lse) if return_lse else o
