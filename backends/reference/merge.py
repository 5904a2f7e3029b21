"""`merge_attention_states` of docs/spec.md, literally: weights exp(lse - m) per part and sink, their sum Z."""
from __future__ import annotations

import math

import torch

from .attention import _finish
from .precision import compute_dtype, up


def merge_attention_states(o_a, lse_a, o_b, lse_b, sinks=None, return_lse=False, out=None):
    la, lb = up(lse_a), up(lse_b)                                            # [H, T]
    none = torch.tensor(-math.inf, dtype=la.dtype, device=la.device)
    ls = (up(sinks)[:, None] if sinks is not None else none).expand_as(la)
    m = torch.maximum(torch.maximum(la, lb), ls)
    empty = m == -math.inf                                                   # Z == 0
    m = torch.where(empty, 0.0, m)
    wa, wb, ws = torch.exp(la - m), torch.exp(lb - m), torch.exp(ls - m)
    z = wa + wb + ws
    o = torch.zeros(o_a.shape, dtype=compute_dtype(), device=o_a.device)    # [T, H, Dv]
    for w, part, lse in ((wa, o_a, la), (wb, o_b, lb)):
        read = (lse > -math.inf).T[..., None]                                # an empty part's row is not read
        o = o + torch.where(read, (w / torch.where(empty, 1.0, z)).T[..., None] * up(part), 0.0)
    lse = torch.where(empty, -math.inf, m + torch.log(z))
    return _finish(o, lse, o_a.dtype, return_lse, out)
