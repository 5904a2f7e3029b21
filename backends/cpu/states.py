"""State plumbing shared by the recurrent ops of the cpu backend (SPEC "States", docs/spec.md).

Sequence forms: `initial_states` gives every sequence's starting state in float32 (`initial_state[i]`,
the cache row `state_indices[i]`, or zero where that index is -1, `has_initial_state[i]` is False or
nothing is given) and `finish` puts the final states where they go (the cache rows in place, in the
cache's dtype, -1 skipped; or a new `final_state`). `run_sequences` drives a per-sequence kernel between
the two. Step forms: one `gather` of the state rows, one in-place `scatter` back.
"""
from __future__ import annotations

from typing import Callable

import torch


def gather(cache: torch.Tensor, rows: torch.Tensor, read: torch.Tensor | None = None) -> torch.Tensor:
    """float32 copies of `cache[rows]`, zero where a row is -1 (or `read` is False)."""
    keep = rows >= 0 if read is None else (rows >= 0) & read
    states = cache.index_select(0, rows.clamp(min=0).long()).float()
    return states.masked_fill_(~keep.view((-1,) + (1,) * (states.dim() - 1)), 0.0)


def scatter(cache: torch.Tensor, rows: torch.Tensor, states: torch.Tensor) -> None:
    """`cache[rows] = states` in place, in the cache's dtype; -1 rows are skipped."""
    keep = rows >= 0
    cache.index_copy_(0, rows[keep].long(), states[keep].to(cache.dtype))


def initial_states(initial_state, state_indices, has_initial_state, nseq: int, tail: tuple, device) -> torch.Tensor:
    """Every sequence's initial state, float32 [S, *tail]."""
    if state_indices is not None:
        return gather(initial_state, state_indices, has_initial_state)
    if initial_state is not None:
        return initial_state.to(torch.float32, copy=True)
    return torch.zeros((nseq,) + tuple(tail), dtype=torch.float32, device=device)


def finish(finals: torch.Tensor, initial_state, state_indices, output_final_state: bool,
           default_dtype=torch.float32):
    """Write the final states [S, *tail] back into the cache (with `state_indices`) and return the op's
    `final_state`: the cache, or a new tensor in the dtype of `initial_state` (else `default_dtype`)."""
    if state_indices is not None:
        scatter(initial_state, state_indices, finals)
        return initial_state if output_final_state else None
    if not output_final_state:
        return None
    return finals.to(initial_state.dtype if initial_state is not None else default_dtype)


Kernel = Callable[[int, int, torch.Tensor], torch.Tensor]


def run_sequences(kernel: Kernel, n_tok: int, tail: tuple, device, cu_seqlens, initial_state, state_indices,
                  has_initial_state, output_final_state: bool):
    """`kernel(start, end, s0)` runs one sequence from its float32 state `s0` (writing its outputs) and
    returns its final state; returns the op's `final_state`."""
    cu = [0, n_tok] if cu_seqlens is None else cu_seqlens.tolist()
    states = initial_states(initial_state, state_indices, has_initial_state, len(cu) - 1, tail, device)
    for i in range(len(cu) - 1):
        states[i] = kernel(cu[i], cu[i + 1], states[i])
    return finish(states, initial_state, state_indices, output_final_state)


def emit(y: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A float32 output in the activation dtype, written into `out` when given."""
    return y.to(dtype) if out is None else out.copy_(y)
