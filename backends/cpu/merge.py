"""merge_attention_states on the CPU: float32 weights exp(lse_part - lse) applied in one pass per part."""
from __future__ import annotations

import math

import torch


def _weighted(o, lse, total):
    """o [T, H, Dv] times exp(lse - total) [H, T] in float32; 0 where the part saw nothing (its o not read)."""
    w = torch.where(lse > -math.inf, torch.exp(lse - total), 0.0).T[..., None]   # [T, H, 1]
    return torch.where(w > 0, w * o.float(), 0.0)


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks=None, return_lse=False, out=None):
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)                                                  # [H, T]
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float()[:, None])
    total = torch.where(lse > -math.inf, lse, 0.0)                                 # Z == 0: both weights 0
    o = _weighted(o_a, la, total) + _weighted(o_b, lb, total)
    if out is None:
        out = o_a.new_empty(o.shape).copy_(o)  # new and contiguous (o follows the strides of lse^T)
    else:
        out.copy_(o)
    return (out, lse) if return_lse else out
