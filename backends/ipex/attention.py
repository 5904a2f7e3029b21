"""attention through ipex.llm.functional.varlen_attention, decode through PagedAttention's
single_query_cached_kv_attention on a heads-major cache (support.py refuses what they do not compute)."""
from __future__ import annotations

import torch

from .kernels import llm


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None):
    o = out if out is not None and out.is_contiguous() else q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    if cu_seqlens_q is None:
        cu_seqlens_q = cu_seqlens_k = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    longest = int(lens.max()) if lens.numel() else 0
    if longest == 0:  # no queries anywhere (the kernel wants some)
        o.zero_()
    else:
        q, k, v = (x.contiguous() for x in (q, k, v))  # the kernel reads token-major rows
        llm().functional.varlen_attention(q, k, v, o, cu_seqlens_q, cu_seqlens_k, None, longest,
                                          max_seqlen_k or int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()), 0.0,
                                          softmax_scale, False, causal, False, None)
        empty = (cu_seqlens_k[1:] == cu_seqlens_k[:-1]).repeat_interleave(lens)  # sequences with no keys
        if bool(empty.any()):
            o[empty] = 0
    if out is not None and o is not out:
        out.copy_(o)
        o = out
    return o


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    o = out if out is not None and out.is_contiguous() else q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])
    longest = max_seqlen_k if max_seqlen_k is not None else (int(seqused_k.max()) if seqused_k.numel() else 0)
    o.zero_()  # sequences with no keys; the kernel writes the others
    if longest > 0:
        hq, hkv = q.shape[1], k_cache.shape[2]
        kv_head = torch.arange(hkv, dtype=torch.int32, device=q.device).repeat_interleave(hq // hkv)
        llm().modules.PagedAttention.single_query_cached_kv_attention(
            o, q.contiguous(), k_cache.transpose(1, 2), v_cache.transpose(1, 2), kv_head, softmax_scale, block_table,
            seqused_k, k_cache.shape[1], longest, None)
        o[seqused_k == 0] = 0
    if out is not None and o is not out:
        out.copy_(o)
        o = out
    return o
