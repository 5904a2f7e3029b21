"""Memory a call may not let into any output (docs/spec.md, "What a query cannot see"): keys no query of
the call sees, cache slots and blocks no sequence uses, state-cache rows the call does not read, the output
rows of an empty part (lse -inf) of a merge. The
runner fills it with NaN for the backend while the oracle reads the finite values."""
from __future__ import annotations

import torch

from ..optable import OPS
from ..backends.reference.attention import _bounds, _visible

POISON = float("nan")


def invisible(op: str, inp: dict) -> dict[str, torch.Tensor]:
    """Argument name -> bool mask (its shape) of the elements no output may depend on."""
    if op == "attention":
        seen = _seen_dense(inp)
        return {n: ~seen[..., None].expand_as(inp[n]) for n in ("k", "v")}
    if op == "paged_attention":
        seen = _seen_paged(inp)
        return {n: ~seen[..., None].expand_as(inp[n]) for n in ("k_cache", "v_cache")}
    if op == "sparse_attention":
        seen = _seen_sparse(inp)
        return {n: ~seen[..., None].expand_as(inp[n]) for n in ("k", "v")}
    if op == "merge_attention_states":  # the rows of a part that saw nothing (lse -inf)
        return {f"o_{p}": (inp[f"lse_{p}"] == float("-inf")).T[..., None].expand_as(inp[f"o_{p}"]) for p in "ab"}
    name = OPS[op].mutates[0]
    if inp.get("state_indices") is None or inp.get(name) is None:
        return {}
    read = _rows_read(inp, name)
    cache = inp[name]
    return {name: ~read.view(-1, *[1] * (cache.dim() - 1)).expand_as(cache)}


def poison(inp: dict, masks: dict[str, torch.Tensor]) -> dict:
    """A copy of `inp` with NaN wherever `masks` says."""
    return inp | {n: torch.where(m, torch.tensor(POISON, dtype=inp[n].dtype, device=m.device), inp[n])
                  for n, m in masks.items()}


def restore(got: torch.Tensor, finite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An in-place output (a cache) with the poison the call left in place back to the finite values the
    oracle saw; a poisoned row the call had to write and did not stays wrong (finite, but not the oracle's)."""
    return torch.where(mask & torch.isnan(got), finite.to(got.dtype), got)


def _seen_by(s: int, lq: int, lk: int, hq: int, hkv: int, inp: dict, device) -> torch.Tensor:
    """Keys of sequence `s` some query of the call sees, per kv head: bool [Lk, Hkv]."""
    vis = _visible(s, lq, lk, hq, bool(inp.get("causal", False)), tuple(inp.get("window_size", (-1, -1))),
                   inp.get("block_mask"), device)                       # [Hq, Lq, Lk]
    return vis.any(1).reshape(hkv, hq // hkv, lk).any(1).T


def _seen_dense(inp: dict) -> torch.Tensor:
    q, k = inp["q"], inp["k"]
    seen = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)  # [Tk, Hkv]
    qb, kb = _bounds(inp.get("cu_seqlens_q"), q.shape[0]), _bounds(inp.get("cu_seqlens_k"), k.shape[0])
    for s, ((qs, qe), (ks, ke)) in enumerate(zip(qb, kb)):
        seen[ks:ke] = _seen_by(s, qe - qs, ke - ks, q.shape[1], k.shape[1], inp, k.device)
    return seen


def _seen_paged(inp: dict) -> torch.Tensor:
    q, kc, table = inp["q"], inp["k_cache"], inp["block_table"]
    bs = kc.shape[1]
    seen = torch.zeros(kc.shape[:3], dtype=torch.bool, device=kc.device)  # [NB, BS, Hkv]
    cq = inp.get("cu_seqlens_q")
    qb = [(i, i + 1) for i in range(table.shape[0])] if cq is None else _bounds(cq, q.shape[0])
    for s, (qs, qe) in enumerate(qb):
        j = torch.arange(int(inp["seqused_k"][s]), device=kc.device)
        blocks, slots = table[s, j // bs].long(), j % bs
        seen[blocks, slots] |= _seen_by(s, qe - qs, j.numel(), q.shape[1], kc.shape[2], inp, kc.device)
    return seen


def _seen_sparse(inp: dict) -> torch.Tensor:
    q, k, idx = inp["q"], inp["k"], inp["indices"]
    seen = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)  # [Tk, Hkv]
    qb, kb = _bounds(inp.get("cu_seqlens_q"), q.shape[0]), _bounds(inp.get("cu_seqlens_k"), k.shape[0])
    for (qs, qe), (ks, _) in zip(qb, kb):
        for h in range(k.shape[1]):
            listed = idx[qs:qe, h].flatten()
            seen[ks + listed[listed >= 0].long(), h] = True
    return seen


def _rows_read(inp: dict, name: str) -> torch.Tensor:
    """Cache rows the call reads: listed, and (sequence forms) with has_initial_state True. bool [slots]."""
    rows, has = inp["state_indices"].long(), inp.get("has_initial_state")
    keep = rows >= 0 if has is None else (rows >= 0) & has
    read = torch.zeros(inp[name].shape[0], dtype=torch.bool, device=rows.device)
    read[rows[keep]] = True
    return read
