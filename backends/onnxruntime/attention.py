"""The attention family's host side: what each query sees, as the masks and gather indices the graphs take
(graphs.py); the graphs do the arithmetic. Visibility is docs/spec.md's, computed by the reference's own
`_visible` (bottom-right positions, windows, block masks), so no second copy of those rules exists."""
from __future__ import annotations

import math

import torch

from portable_attn.backends.reference.attention import _bounds, _visible

from . import sessions


def bounds(cu, total: int) -> list:
    """(start, end) of each packed sequence; one sequence when `cu` is None."""
    return _bounds(cu, total)


def dense(a: dict, q, hkv: int, q_bounds: list, k_bounds: list) -> dict:
    """allow bool [1|Hq, Tq, Tk] (packed sequences along one row, block-diagonal) and keep bool [Tk, Hkv]
    (keys some query of their kv head sees) for `attention` / `paged_attention`, sequences packed as given."""
    bm = a.get("block_mask")
    hq, hm = q.shape[1], (bm.layout.shape[1] if bm is not None else 1)
    tk = k_bounds[-1][1] if k_bounds else 0
    allow = torch.zeros(hm, q.shape[0], tk, dtype=torch.bool)
    for s, ((qs, qe), (ks, ke)) in enumerate(zip(q_bounds, k_bounds)):
        allow[:, qs:qe, ks:ke] = _visible(s, qe - qs, ke - ks, 1, a["causal"], a["window_size"], bm, q.device)
    seen = allow.any(1)  # [Hm, Tk]
    keep = (seen.T.expand(tk, hkv) if hm == 1 else seen.reshape(hkv, hq // hkv, tk).any(1).T)
    return {"allow": allow, "keep": keep.contiguous()}


def paged_slots(a: dict) -> tuple[torch.Tensor, list]:
    """Flat cache slots [Tk] of every sequence's keys in order (block_table[i, j // BS] * BS + j % BS for
    j < seqused_k[i]) and the keys' packed bounds."""
    lens, table, bs = a["seqused_k"].long(), a["block_table"].long(), a["k_cache"].shape[1]
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    j = torch.arange(int(cu[-1])) - cu[seq]
    slots = table[seq, j // bs] * bs + j % bs
    c = cu.tolist()
    return slots, list(zip(c[:-1], c[1:]))


def sparse(a: dict, q, k) -> dict:
    """pick int64 [Tq, Hkv, topk]: rows of k viewed as [Tk * Hkv, D] (listed key of the query's sequence,
    its kv head; row 0 for a -1 slot); keep bool [Tq, Hkv, topk] (listed); allow bool [Tq, Hq, 1, topk]."""
    idx = a["indices"].long()
    tq, hkv = idx.shape[:2]
    start = torch.zeros(tq, dtype=torch.long)
    if a["cu_seqlens_q"] is not None:
        cq, ck = a["cu_seqlens_q"].long(), a["cu_seqlens_k"].long()
        start = torch.repeat_interleave(ck[:-1], cq[1:] - cq[:-1])
    keep = idx >= 0
    pick = torch.where(keep, (start[:, None, None] + idx) * hkv + torch.arange(hkv)[None, :, None], 0)
    allow = keep.repeat_interleave(q.shape[1] // hkv, dim=1)[:, :, None, :]
    return {"pick": pick, "keep": keep, "allow": allow}


def nothing_visible(q, dv: int, sinks) -> tuple[torch.Tensor, torch.Tensor]:
    """o = 0 and lse = the sink (or -inf) for every query: a call without keys (no graph to run)."""
    hq, tq = q.shape[1], q.shape[0]
    lse = (sinks.float()[:, None].expand(hq, tq).clone() if sinks is not None
           else torch.full((hq, tq), -math.inf))
    return torch.zeros(tq, hq, dv), lse


def run(kind: str, a: dict, q, dv: int, feeds: dict, keys: int):
    """Run attention graph `kind` on float32 `feeds` (q, scale and sinks added here) over `keys` keys (per query
    for sparse_attention); the op's return value."""
    sig = {"sinks": a["sinks"] is not None, "softcap": float(a["softcap"]), "lse": bool(a["return_lse"])}
    if kind == "attention":
        sig["paged"] = "k_cache" in feeds
    tq, hq = q.shape[:2]
    out = a["out"]
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    o = out if direct else torch.empty(tq, hq, dv)
    lse = torch.empty(hq, tq) if sig["lse"] else None
    if tq and keys:
        inputs = dict(feeds, q=q.float(), scale=torch.tensor(a["softmax_scale"], dtype=torch.float32))
        if a["sinks"] is not None:
            inputs["sinks"] = a["sinks"].float()
        sessions.run(kind, sig, inputs, {"out": o} | ({"lse": lse} if lse is not None else {}))
    else:
        empty_o, empty_lse = nothing_visible(q, dv, a["sinks"])
        o.copy_(empty_o)
        if lse is not None:
            lse.copy_(empty_lse)
    if not direct:
        o = o.to(q.dtype) if out is None else out.copy_(o)
    return (o, lse) if sig["lse"] else o
