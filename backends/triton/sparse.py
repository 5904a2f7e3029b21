"""sparse_attention: one program per (query, kv head) with the query heads of that kv group as the rows
of one tile; it walks the query's `indices` in steps of BLOCK_K, gathers only the listed key rows of the
query's own sequence and runs the online softmax over them. O(Tq * topk * D) work.

The query's sequence is found by a binary search of `cu_seqlens_q` inside the kernel (no host sync).
Unused slots (-1), and any position outside [0, Lk) or outside `k`, are masked: never read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import clamp, dot, finish, join_sink, softmax_step, stride, tanh
from .decode import query_heads
from .tuning import entry


@triton.jit
def _sparse_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, cuq_ptr, cuk_ptr, sink_ptr, o_ptr, lse_ptr,
                   q_st, q_sh, q_sd, k_st, k_sh, k_sd, v_st, v_sh, v_sd,
                   i_st, i_sh, i_sk, o_st, o_sh, o_sd, l_sh, l_st, cq_st, ck_st, sk_st,
                   NSEQ, TK, G, HEADS, D, DV, TOPK,
                   scale, softcap,
                   SEARCH_STEPS, VARLEN: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0)
    hk = tl.program_id(1) // (G // HEADS)  # kv head, and the tile of its query heads
    ht = tl.program_id(1) % (G // HEADS)
    t64 = t.to(tl.int64)
    if VARLEN:
        # the last sequence i with cu_seqlens_q[i] <= t (the one holding t; empty ones come before it)
        lo = t * 0
        hi = lo + NSEQ
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(cuq_ptr + mid * cq_st) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        k0 = tl.load(cuk_ptr + lo * ck_st)
        lk = tl.load(cuk_ptr + (lo + 1) * ck_st) - k0
    else:
        k0 = t * 0
        lk = k0 + TK

    g = tl.arange(0, BLOCK_G)
    h = hk * G + ht * HEADS + g
    gm = g < HEADS
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + t64 * q_st + h[:, None] * q_sh + d[None, :] * q_sd,
                mask=gm[:, None] & (d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for c0 in range(0, TOPK, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        pos = tl.load(idx_ptr + t64 * i_st + hk * i_sh + c * i_sk, mask=c < TOPK, other=-1)
        row = k0 + pos
        valid = (pos >= 0) & (pos < lk) & (row >= 0) & (row < TK)
        row = clamp(row, 0, TK - 1).to(tl.int64)
        kt = tl.load(k_ptr + row[None, :] * k_st + hk * k_sh + d[:, None] * k_sd,
                     mask=valid[None, :] & (d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_K]
        sc = dot(q, kt) * scale
        if HAS_SOFTCAP:
            sc = softcap * tanh(sc / softcap)
        v = tl.load(v_ptr + row[:, None] * v_st + hk * v_sh + e[None, :] * v_sd,
                    mask=valid[:, None] & (e[None, :] < DV), other=0.0)  # [BLOCK_K, BLOCK_DV]
        m_i, l_i, acc = softmax_step(sc, valid, v, m_i, l_i, acc)

    if HAS_SINKS:  # one more logit in the denominator
        sink = tl.load(sink_ptr + h * sk_st, mask=gm, other=float("-inf")).to(tl.float32)
        m_i, l_i, acc = join_sink(sink, m_i, l_i, acc)
    o, lse = finish(m_i, l_i, acc)
    tl.store(o_ptr + t64 * o_st + h[:, None] * o_sh + e[None, :] * o_sd, o.to(o_ptr.dtype.element_ty),
             mask=gm[:, None] & (e[None, :] < DV))
    tl.store(lse_ptr + h * l_sh + t64 * l_st, lse, mask=gm)


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, out=None):
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    topk = indices.shape[2] if tk else 0  # no keys at all: nothing can be listed
    o = out if out is not None else q.new_empty(tq, hq, dv)
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    if tq == 0 or hq == 0:
        return (o, lse) if return_lse else o
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    group = hq // hkv
    ent = entry(q)
    heads = query_heads(group, ent.max_rows)
    block_g = max(triton.next_power_of_2(heads), ent.min_dot)
    block_d = max(triton.next_power_of_2(d), ent.min_dot)
    block_dv = max(triton.next_power_of_2(dv), ent.min_dot)
    block_k = max(ent.block_n if max(block_d, block_dv) <= 128 else ent.big_head_block_n, ent.min_dot)
    block_k = min(block_k, max(triton.next_power_of_2(topk), ent.min_dot))
    varlen = cu_seqlens_q is not None
    nseq = cu_seqlens_q.shape[0] - 1 if varlen else 1
    _sparse_kernel[(tq, hkv * (group // heads))](
        q_ptr=q, k_ptr=k, v_ptr=v, idx_ptr=indices, cuq_ptr=cu_seqlens_q, cuk_ptr=cu_seqlens_k, sink_ptr=sinks,
        o_ptr=o, lse_ptr=lse,
        q_st=q.stride(0), q_sh=q.stride(1), q_sd=q.stride(2), k_st=k.stride(0), k_sh=k.stride(1), k_sd=k.stride(2),
        v_st=v.stride(0), v_sh=v.stride(1), v_sd=v.stride(2), i_st=indices.stride(0), i_sh=indices.stride(1),
        i_sk=indices.stride(2), o_st=o.stride(0), o_sh=o.stride(1), o_sd=o.stride(2), l_sh=lse.stride(0),
        l_st=lse.stride(1), cq_st=stride(cu_seqlens_q, 0), ck_st=stride(cu_seqlens_k, 0), sk_st=stride(sinks, 0),
        NSEQ=nseq, TK=tk, G=group, HEADS=heads, D=d, DV=dv, TOPK=topk, scale=scale, softcap=float(softcap),
        SEARCH_STEPS=max(1, nseq.bit_length()), VARLEN=varlen,
        HAS_SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=max(1, min(ent.num_warps, 4)), num_stages=ent.num_stages, **dict(ent.options))
    return (o, lse) if return_lse else o
