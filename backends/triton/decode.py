"""Split-KV decode for paged_attention (flash-decoding): one query per sequence, the visible keys of a
sequence cut into `num_splits` contiguous ranges so that a small batch of long sequences still fills the
GPU. Pass 1, grid (S, Hkv x head tiles, num_splits): the query heads of one kv group (all of them, or
a divisor of the group when it is larger than a tile may hold) are the rows of one tile, keys
are gathered through the block table (any block size: key j is slot `block_table[s, j // BS] * BS +
j % BS`), and each split writes its normalised partial output and log-sum-exp to a float32 workspace.
Pass 2, grid (S, Hq): the partials are merged in split order with the sink joined once; no atomics, so
the same inputs give the same bits. With one split, pass 1 writes the final output itself.

Every load is masked, block ids and key counts are clamped into their tensors: an unchecked bad index
gives a wrong answer, never a memory fault.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .common import BIG, INTERPRET, clamp, dot, finish, join_sink, softmax_step, stride, tanh
from .tuning import entry

MAX_SPLITS = 64
INTERPRET_SMS = 16  # the interpreter's pretend GPU: small, so the tests' small batches still split
MIN_SPLIT_KEYS = 32 if INTERPRET else 256  # fewer keys per split cost more in the merge than they gain


@triton.jit
def _split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, su_ptr, sink_ptr, o_ptr, lse_ptr,
                  q_ss, q_sh, q_sd,
                  kc_sb, kc_ss, kc_sh, kc_sd,
                  vc_sb, vc_ss, vc_sh, vc_sd,
                  bt_ss, bt_sb, su_st, sk_st,
                  o_ss, o_sh, o_sp, o_sd,
                  l_ss, l_sh, l_sp,
                  NB, MB, BS, G, HEADS, D, DV, SPLITS, LEFT,
                  scale, softcap,
                  FINAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1) // (G // HEADS)  # kv head, and the tile of its query heads
    ht = tl.program_id(1) % (G // HEADS)
    sp = tl.program_id(2)
    lk = clamp(tl.load(su_ptr + s * su_st), 0, MB * BS)  # keys of this sequence, inside its block-table row
    # the query sits at position lk - 1: causality and a right window hide nothing, a left window
    # (LEFT = BIG when unbounded) starts the visible range at lk - 1 - LEFT
    lo = tl.maximum(lk - 1 - LEFT, 0)
    per = tl.cdiv(tl.cdiv(lk - lo, SPLITS), BLOCK_N) * BLOCK_N  # keys per split, whole tiles
    start = lo + sp * per
    end = tl.minimum(start + per, lk)

    g = tl.arange(0, BLOCK_G)
    h = hk * G + ht * HEADS + g  # the query heads of kv head hk, one per row
    gm = g < HEADS
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + s * q_ss + h[:, None] * q_sh + d[None, :] * q_sd,
                mask=gm[:, None] & (d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col = j // BS
        valid = (j < end) & (col < MB)
        blk = tl.load(bt_ptr + s * bt_ss + col * bt_sb, mask=valid, other=0)
        blk = clamp(blk, 0, NB - 1).to(tl.int64)
        off = j - col * BS
        kt = tl.load(kc_ptr + blk[None, :] * kc_sb + off[None, :] * kc_ss + hk * kc_sh + d[:, None] * kc_sd,
                     mask=valid[None, :] & (d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        sc = dot(q, kt) * scale
        if HAS_SOFTCAP:
            sc = softcap * tanh(sc / softcap)
        v = tl.load(vc_ptr + blk[:, None] * vc_sb + off[:, None] * vc_ss + hk * vc_sh + e[None, :] * vc_sd,
                    mask=valid[:, None] & (e[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        m_i, l_i, acc = softmax_step(sc, valid, v, m_i, l_i, acc)

    if FINAL and HAS_SINKS:  # one split: the sink joins the denominator here
        sink = tl.load(sink_ptr + h * sk_st, mask=gm, other=float("-inf")).to(tl.float32)
        m_i, l_i, acc = join_sink(sink, m_i, l_i, acc)
    o, lse = finish(m_i, l_i, acc)
    tl.store(o_ptr + s * o_ss + h[:, None] * o_sh + sp * o_sp + e[None, :] * o_sd, o.to(o_ptr.dtype.element_ty),
             mask=gm[:, None] & (e[None, :] < DV))
    tl.store(lse_ptr + s * l_ss + h * l_sh + sp * l_sp, lse, mask=gm)


@triton.jit
def _merge_kernel(ow_ptr, lw_ptr, sink_ptr, o_ptr, lse_ptr,
                  ow_ss, ow_sh, ow_sp, ow_sd, lw_ss, lw_sh, lw_sp,
                  o_ss, o_sh, o_sd, l_ss, l_sh, sk_st,
                  SPLITS, DV,
                  HAS_SINKS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK_SPLITS)
    im = i < SPLITS
    e = tl.arange(0, BLOCK_DV)
    part_lse = tl.load(lw_ptr + s * lw_ss + h * lw_sh + i * lw_sp, mask=im, other=float("-inf"))
    m = tl.max(part_lse, 0)
    if HAS_SINKS:
        sink = tl.load(sink_ptr + h * sk_st).to(tl.float32)
        m = tl.maximum(m, sink)
    m_u = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(part_lse - m_u)  # [BLOCK_SPLITS]
    z = tl.sum(w, 0)
    if HAS_SINKS:
        z += tl.exp(sink - m_u)
    parts = tl.load(ow_ptr + s * ow_ss + h * ow_sh + i[:, None] * ow_sp + e[None, :] * ow_sd,
                    mask=im[:, None] & (e[None, :] < DV), other=0.0)
    zs = tl.where(z > 0, z, 1.0)
    o = tl.sum(w[:, None] * parts, 0) / zs
    tl.store(o_ptr + s * o_ss + h * o_sh + e * o_sd, o.to(o_ptr.dtype.element_ty), mask=e < DV)
    tl.store(lse_ptr + s * l_ss + h * l_sh, tl.where(z > 0, m_u + tl.log(zs), float("-inf")))


def query_heads(group: int, max_rows: int) -> int:
    """Query heads one program packs as rows: the whole kv group, or its largest divisor <= max_rows."""
    heads = min(group, max_rows)
    while group % heads:
        heads -= 1
    return heads


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Compute units of the device (SMs, AMD CUs, Intel Xe cores); the interpreter's is INTERPRET_SMS."""
    if INTERPRET or device.type == "cpu":
        return INTERPRET_SMS
    if device.type == "xpu":
        props = torch.xpu.get_device_properties(device)
        return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64) // 8 or 64)
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def split_count(batch: int, kv_heads: int, max_keys: int, device) -> int:
    """How many splits a decode of `batch` sequences of at most `max_keys` keys wants: enough programs
    for about two waves over the device's compute units, each split holding at least MIN_SPLIT_KEYS
    keys, at most MAX_SPLITS. Host ints only (no device sync, so CUDA graphs can capture it)."""
    programs = batch * kv_heads
    if programs == 0 or max_keys <= MIN_SPLIT_KEYS:
        return 1
    want = triton.cdiv(2 * _sm_count(torch.device(device)), programs)
    return max(1, min(want, triton.cdiv(max_keys, MIN_SPLIT_KEYS), MAX_SPLITS))


def splits_for(q, k_cache, block_table, *, window_size=(-1, -1), max_seqlen_k=None) -> int:
    """`split_count` for a decode call: the longest context is `max_seqlen_k`, else the block table's
    capacity, capped by a left window. paged_attention routes a decode to `decode_split` when this is > 1."""
    max_keys = max_seqlen_k if max_seqlen_k is not None else block_table.shape[1] * k_cache.shape[1]
    if window_size[0] >= 0:
        max_keys = min(max_keys, window_size[0] + 1)
    return split_count(q.shape[0], k_cache.shape[2], max_keys, q.device)


def decode_split(q, k_cache, v_cache, block_table, seqused_k, *, window_size=(-1, -1), softcap=0.0, sinks=None,
                 softmax_scale=None, out=None, return_lse=False, max_seqlen_k=None, num_splits=None):
    """paged_attention's decode (one query per sequence, `q [S, Hq, D]`) with split KV.

    Arguments as paged_attention's, checked; `causal` is not taken because a decode query, at the last
    position, sees no key after it either way. `num_splits=None` picks `split_count` from the batch, the
    longest context (`max_seqlen_k`, else the block table's capacity) and the device. Returns `o`, or
    `(o, lse)` with `return_lse`.
    """
    nseq, hq, d = q.shape
    nb, bs, hkv, dv = v_cache.shape
    o = out if out is not None else q.new_empty(nseq, hq, dv)
    lse = torch.empty(hq, nseq, dtype=torch.float32, device=q.device)
    if nseq == 0 or hq == 0:
        return (o, lse) if return_lse else o
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    left = window_size[0]
    left = BIG if left < 0 else min(left, BIG)
    if num_splits is None:
        num_splits = splits_for(q, k_cache, block_table, window_size=window_size, max_seqlen_k=max_seqlen_k)
    num_splits = max(1, int(num_splits))
    group = hq // hkv
    e = entry(q)
    heads = query_heads(group, e.max_rows)
    block_g = max(triton.next_power_of_2(heads), e.min_dot)
    block_d = max(triton.next_power_of_2(d), e.min_dot)
    block_dv = max(triton.next_power_of_2(dv), e.min_dot)
    block_n = max(e.block_n if max(block_d, block_dv) <= 128 else e.big_head_block_n, e.min_dot)
    launch = {"num_warps": max(1, min(e.num_warps, 4)), "num_stages": e.num_stages, **dict(e.options)}
    if num_splits == 1:  # pass 1 writes the output itself: o [S, Hq, 1, Dv] and lse [S, Hq, 1], one split
        ow, lw = o.unsqueeze(2), lse.t().unsqueeze(2)
    else:
        ow = torch.empty(nseq, hq, num_splits, dv, dtype=torch.float32, device=q.device)
        lw = torch.empty(nseq, hq, num_splits, dtype=torch.float32, device=q.device)
    _split_kernel[(nseq, hkv * (group // heads), num_splits)](
        q_ptr=q, kc_ptr=k_cache, vc_ptr=v_cache, bt_ptr=block_table, su_ptr=seqused_k, sink_ptr=sinks, o_ptr=ow,
        lse_ptr=lw,
        q_ss=q.stride(0), q_sh=q.stride(1), q_sd=q.stride(2),
        kc_sb=k_cache.stride(0), kc_ss=k_cache.stride(1), kc_sh=k_cache.stride(2), kc_sd=k_cache.stride(3),
        vc_sb=v_cache.stride(0), vc_ss=v_cache.stride(1), vc_sh=v_cache.stride(2), vc_sd=v_cache.stride(3),
        bt_ss=block_table.stride(0), bt_sb=block_table.stride(1), su_st=seqused_k.stride(0),
        sk_st=stride(sinks, 0), o_ss=ow.stride(0), o_sh=ow.stride(1), o_sp=ow.stride(2), o_sd=ow.stride(3),
        l_ss=lw.stride(0), l_sh=lw.stride(1), l_sp=lw.stride(2),
        NB=nb, MB=block_table.shape[1] if nb else 0, BS=bs, G=group, HEADS=heads, D=d, DV=dv,  # no blocks: no keys
        SPLITS=num_splits, LEFT=left, scale=scale, softcap=float(softcap),
        FINAL=num_splits == 1, HAS_SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, **launch)
    if num_splits > 1:
        _merge_kernel[(nseq, hq)](
            ow_ptr=ow, lw_ptr=lw, sink_ptr=sinks, o_ptr=o, lse_ptr=lse,
            ow_ss=ow.stride(0), ow_sh=ow.stride(1), ow_sp=ow.stride(2), ow_sd=ow.stride(3), lw_ss=lw.stride(0),
            lw_sh=lw.stride(1), lw_sp=lw.stride(2), o_ss=o.stride(0), o_sh=o.stride(1), o_sd=o.stride(2),
            l_ss=lse.stride(1), l_sh=lse.stride(0), sk_st=stride(sinks, 0), SPLITS=num_splits, DV=dv,
            HAS_SINKS=sinks is not None, BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_DV=block_dv,
            num_warps=launch["num_warps"])
    return (o, lse) if return_lse else o
