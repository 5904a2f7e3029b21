"""State plumbing shared by the recurrent ops of the cpu backend (SPEC "States", docs/spec.md).

Sequence forms: `initial_states` gives every sequence's starting state in float32 (`initial_state[i]`,
the cache row `state_indices[i]`, or zero where that index is -1, `has_initial_state[i]` is False or
nothing is given) and `finish` puts the final states where they go (the cache rows in place, in the
cache's dtype, -1 skipped; or a new `final_state`). `run_sequences` drives a per-sequence kernel between
the two. Step forms: `update_rows`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .workspace import buffer


def gather(cache: torch.Tensor, rows: torch.Tensor, read: torch.Tensor | None = None,
           into: torch.Tensor | None = None) -> torch.Tensor:
    """float32 copies of `cache[rows]` (written into `into` when given), zero where a row is -1 (or `read`
    is False): only those rows are zeroed, not a pass over all."""
    keep = rows >= 0 if read is None else (rows >= 0) & read
    safe = rows.clamp(min=0)
    if into is None:
        states = cache.index_select(0, safe).float()
    elif into.dtype == cache.dtype:
        states = torch.index_select(cache, 0, safe, out=into)
    else:
        states = into.copy_(cache.index_select(0, safe))
    if not bool(keep.all()):
        states.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    return states


def scatter(cache: torch.Tensor, rows: torch.Tensor, states: torch.Tensor) -> None:
    """`cache[rows] = states` in place, in the cache's dtype; -1 rows are skipped."""
    if bool((rows >= 0).all()):
        cache.index_copy_(0, rows.long(), states.to(cache.dtype))
        return
    keep = (rows >= 0).nonzero().squeeze(1)
    cache.index_copy_(0, rows.index_select(0, keep).long(), states.index_select(0, keep).to(cache.dtype))


def update_rows(cache: torch.Tensor, rows: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor]):
    """A step form's state update: `step(s)` gets the float32 states s [bsz, *tail] of the listed cache
    rows (zero for a -1 row), updates them in place and returns the step's output, which this returns
    after the rows are back in the cache. Consecutive rows are a slice: of a float32 cache updated where
    they lie, else converted into and back from one scratch buffer; other rows go through scratch buffers
    (kept across calls: fresh multi-MB copies cost page faults)."""
    idx = rows.tolist()
    shape = (len(idx), *cache.shape[1:])
    if idx and idx[0] >= 0 and idx == list(range(idx[0], idx[0] + len(idx))):
        block = cache[idx[0]:idx[0] + len(idx)]
        if cache.dtype == torch.float32:
            return step(block)
        s = buffer("states", shape, torch.float32).copy_(block)
        y = step(s)
        block.copy_(s)
        return y
    s = gather(cache, rows, into=buffer("states", shape, torch.float32))
    y = step(s)
    scatter(cache, rows, s if cache.dtype == torch.float32 else buffer("states.cache", shape, cache.dtype).copy_(s))
    return y


def initial_states(initial_state, state_indices, has_initial_state, nseq: int, tail: tuple, device) -> torch.Tensor:
    """Every sequence's initial state, float32 [S, *tail]."""
    if state_indices is not None:
        return gather(initial_state, state_indices, has_initial_state)
    if initial_state is not None:
        return initial_state.to(torch.float32, copy=True)
    return torch.zeros((nseq,) + tuple(tail), dtype=torch.float32, device=device)


def packed(n_tok: int, cu_seqlens, initial_state, state_indices, has_initial_state, tail: tuple, device):
    """A compiled sequence kernel's arguments: the sequence bounds as int64 [S + 1] and every sequence's initial
    state, float32 [S, *tail] contiguous (updated in place into its final state)."""
    cu = torch.tensor([0, n_tok]) if cu_seqlens is None else cu_seqlens.long().contiguous()
    return cu, initial_states(initial_state, state_indices, has_initial_state, cu.shape[0] - 1, tail,
                              device).contiguous()


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
