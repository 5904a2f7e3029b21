"""causal_conv1d_step through MambaMixer.causal_conv1d_update: the listed state rows gathered, updated by
the kernel, written back (rows not listed stay untouched)."""
from __future__ import annotations

import torch

from .kernels import llm


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None):
    bsz = x.shape[0]
    idx = torch.arange(bsz, device=x.device) if state_indices is None else state_indices.long()
    rows = state.index_select(0, idx.clamp(min=0)).to(x.dtype)  # [bsz, C, W-1], a copy the kernel updates
    skipped = idx < 0
    rows[skipped] = 0  # SPEC: a skipped sequence starts from zeros and writes nothing back
    weight, bias = (None if t is None else t.to(x.dtype).contiguous() for t in (weight, bias))  # read densely
    y = llm().modules.MambaMixer.causal_conv1d_update(x.contiguous(), rows, weight, bias, activation)
    keep = (~skipped).nonzero().flatten()
    state.index_copy_(0, idx.index_select(0, keep), rows.index_select(0, keep).to(state.dtype))
    if out is None:
        return y
    out.copy_(y)
    return out
