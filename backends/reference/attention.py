"""The attention family of docs/spec.md, literally: per sequence, the full score matrix and a visibility mask.

Arguments arrive checked and normalised by `portable_attn.checks` (scale a float, window an int pair).
Every matrix product goes through `mm` and every input through `up`, so that `precision.emulate`
turns this into a model of a low-precision kernel.
"""
from __future__ import annotations

import math

import torch

from .precision import compute_dtype, mm, up


def _bounds(cu: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence; one sequence when `cu` is None."""
    if cu is None:
        return [(0, total)]
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _visible(s: int, lq: int, lk: int, hq: int, causal: bool, window_size: tuple[int, int], block_mask,
             device) -> torch.Tensor:
    """Visible keys of sequence `s` per query head: bool [Hq, Lq, Lk]."""
    p = torch.arange(lq, device=device) + lk - lq  # [Lq] query positions, bottom-right aligned
    j = torch.arange(lk, device=device)            # [Lk] key positions
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis &= j[None, :] <= p[:, None]
    left, right = window_size
    if left >= 0:
        vis &= j[None, :] >= p[:, None] - left
    if right >= 0:
        vis &= j[None, :] <= p[:, None] + right
    vis = vis.expand(hq, lq, lk)
    if block_mask is not None:
        vis = vis & block_mask.visible(s, p, j)
    return vis


def _core(q, k, v, visible, softmax_scale: float, softcap: float, sinks):
    """One sequence: q [Lq, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv] (compute dtype), visible [Hq, Lq, Lk].

    Returns o [Lq, Hq, Dv] and lse [Hq, Lq], both in the compute dtype.
    """
    lq, hq = q.shape[:2]
    group = hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    s = softmax_scale * mm("qhd,khd->hqk", q, k)  # [Hq, Lq, Lk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, -math.inf)
    sink = up(sinks) if sinks is not None else torch.full((hq,), -math.inf, dtype=s.dtype, device=s.device)
    # the sink is one more logit that joins the denominator only
    logits = torch.cat([s, sink[:, None, None].expand(hq, lq, 1)], dim=-1)  # [Hq, Lq, Lk + 1]
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # Z == 0: nothing to subtract
    e = torch.exp(logits - m)
    z = e.sum(dim=-1)  # [Hq, Lq]
    # the sum runs over visible keys only: a value row a query cannot see never reaches it, whatever it holds
    finite = torch.isfinite(v).all(-1)  # [Lk, Hq]
    o = mm("hqk,khd->qhd", e[..., :-1], torch.where(finite[..., None], v, 0))  # [Lq, Hq, Dv]
    o = o.masked_fill((visible & ~finite.T[:, None, :]).any(-1).T[..., None], math.nan)
    o = o / torch.where(z > 0, z, 1.0).T[..., None]  # Z == 0: e is all 0, so o stays 0
    lse = torch.log(z) + m[..., 0]  # log 0 = -inf when Z == 0
    return o, lse


def _finish(o, lse, dtype, return_lse: bool, out):
    o = o.to(dtype)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse.to(torch.float32)) if return_lse else o


def _dense(q, seqs, dv: int, *, causal, window_size, softcap, sinks, softmax_scale, block_mask, return_lse, out):
    """Attention of each (query start, query end, keys, values) in `seqs`, sequence index = list index."""
    hq = q.shape[1]
    o = torch.zeros(q.shape[0], hq, dv, dtype=compute_dtype(), device=q.device)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=compute_dtype(), device=q.device)
    for s, (qs, qe, k, v) in enumerate(seqs):
        vis = _visible(s, qe - qs, k.shape[0], hq, causal, window_size, block_mask, q.device)
        o[qs:qe], lse[:, qs:qe] = _core(up(q[qs:qe]), up(k), up(v), vis, softmax_scale, softcap, sinks)
    return _finish(o, lse, q.dtype, return_lse, out)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None):
    seqs = [(qs, qe, k[ks:ke], v[ks:ke])
            for (qs, qe), (ks, ke) in zip(_bounds(cu_seqlens_q, q.shape[0]), _bounds(cu_seqlens_k, k.shape[0]))]
    return _dense(q, seqs, v.shape[2], causal=causal, window_size=window_size, softcap=softcap, sinks=sinks,
                  softmax_scale=softmax_scale, block_mask=block_mask, return_lse=return_lse, out=out)


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    nseq, bs = block_table.shape[0], k_cache.shape[1]
    # decode: one query per sequence
    rows = [(i, i + 1) for i in range(nseq)] if cu_seqlens_q is None else _bounds(cu_seqlens_q, q.shape[0])
    seqs = []
    for i, (qs, qe) in enumerate(rows):
        j = torch.arange(int(seqused_k[i]), device=q.device)
        blocks = block_table[i, j // bs].long()  # key j lives in block_table[i, j // BS], slot j % BS
        seqs.append((qs, qe, k_cache[blocks, j % bs], v_cache[blocks, j % bs]))
    return _dense(q, seqs, v_cache.shape[3], causal=causal, window_size=window_size, softcap=softcap, sinks=sinks,
                  softmax_scale=softmax_scale, block_mask=block_mask, return_lse=return_lse, out=out)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0  # -1 marks padding tokens
    slots = slot_mapping[keep].long()
    k_cache[slots // bs, slots % bs] = k[keep]
    v_cache[slots // bs, slots % bs] = v[keep]
    return None


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, out=None):
    hq = q.shape[1]
    group = hq // k.shape[1]
    o = torch.zeros(q.shape[0], hq, v.shape[2], dtype=compute_dtype(), device=q.device)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=compute_dtype(), device=q.device)
    for (qs, qe), (ks, ke) in zip(_bounds(cu_seqlens_q, q.shape[0]), _bounds(cu_seqlens_k, k.shape[0])):
        idx = indices[qs:qe].repeat_interleave(group, dim=1)  # [Lq, Hq, topk], per query head
        j = torch.arange(ke - ks, device=q.device)
        vis = (idx[..., None] == j).any(dim=2).transpose(0, 1)  # [Hq, Lq, Lk]; -1 matches no key
        o[qs:qe], lse[:, qs:qe] = _core(up(q[qs:qe]), up(k[ks:ke]), up(v[ks:ke]), vis, softmax_scale, softcap,
                                        sinks)
    return _finish(o, lse, q.dtype, return_lse, out)
