"""Sequence-parallel `causal_conv1d` over torch.distributed: each rank's parts start from the last W-1
inputs before them, which it gets from the ranks before it.

A part's effect on the conv state is "shift left by its length, then put its last min(L, W-1) inputs
on the right"; these summaries compose exactly (only copies), so the same prefix scan over ranks as
the recurrent ops (`recurrent.scan_ranks`) gives each rank its incoming state even when the parts
before it are shorter than W-1. Communication per rank: (log2(world) + 1) x S x C x (W-1) values.
"""
from __future__ import annotations

import torch

from .. import ops
from .recurrent import scan_ranks


def _shift(state: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """state [S, C, W-1] moved left by n [S] positions, zeros coming in on the right."""
    idx = torch.arange(state.shape[-1], device=state.device)[None] + n.to(state.device)[:, None]   # [S, W-1]
    inside = (idx < state.shape[-1])[:, None, :]
    taken = state.gather(-1, idx.clamp(max=state.shape[-1] - 1)[:, None, :].expand_as(state))
    return torch.where(inside, taken, torch.zeros_like(state))


def _tails(x: torch.Tensor, cu_seqlens, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths int64 [S], the last min(L, W-1) inputs of each sequence, right-aligned [S, C, W-1])."""
    bounds = (torch.tensor([0, x.shape[0]]) if cu_seqlens is None else cu_seqlens.to("cpu", torch.int64))
    lengths = bounds[1:] - bounds[:-1]
    tails = x.new_zeros(len(lengths), x.shape[1], width)
    for i, (b, n) in enumerate(zip(bounds[1:].tolist(), lengths.clamp(max=width).tolist())):
        if n:
            tails[i, :, width - n:] = x[b - n:b].T
    return lengths.to(x.device), tails


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, group=None, backend=None, stats=None):
    """Sequence-parallel `portable_attn.causal_conv1d`.

    Every rank calls it with its own part of each sequence, in rank order: `x [T_r, C]`, `cu_seqlens`
    int32 [S+1] over its part (the same S on every rank; `split_packed` makes them). `weight [C, W]`,
    `bias [C]` and `initial_state [S, C, W-1]` (the state before the first part, or None) are the same
    on every rank. Returns `(y [T_r, C], final_state)`: this rank's outputs, and with
    `output_final_state` the conv state at the end of its part of each sequence (the last rank's is every
    sequence's final state). `stats`, a dict, gets the bytes this rank sent.
    """
    width = weight.shape[1] - 1
    incoming = initial_state
    if width:
        lengths, tails = _tails(x, cu_seqlens, width)
        prefix = scan_ranks((lengths, tails), lambda e, l: (e[0] + l[0], _shift(e[1], l[0].clamp(max=width)) + l[1]),
                            group, stats)
        if prefix is not None:
            n, tail = prefix
            before = tail.new_zeros(tail.shape) if initial_state is None else initial_state
            incoming = _shift(before, n.clamp(max=width)) + tail
    return ops.causal_conv1d(x, weight, bias, activation=activation, initial_state=incoming,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
