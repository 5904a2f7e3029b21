"""State plumbing of the recurrent ops (SPEC "States", docs/spec.md), functional: caches come back updated.

Sequence forms: `initial_states` gives every sequence's starting state in float32 (`initial_state[i]`,
the cache row `state_indices[i]`, or zero where that index is -1, `has_initial_state[i]` is False or
nothing is given); `finish` returns the updated cache (final states in the listed rows, in the cache's
dtype, -1 skipped) or the new final states. Step forms: `gather` the rows, `scatter` them back.
"""
from __future__ import annotations

import jax.numpy as jnp


def gather(cache, rows, read=None):
    """float32 copies of cache[rows], zero where a row is -1 (or `read` is False)."""
    keep = rows >= 0 if read is None else (rows >= 0) & read
    states = jnp.take(cache, jnp.maximum(rows, 0), axis=0).astype(jnp.float32)
    return jnp.where(keep.reshape((-1,) + (1,) * (states.ndim - 1)), states, 0.0)


def scatter(cache, rows, states):
    """cache with cache[rows] = states (in the cache's dtype); -1 rows are dropped."""
    target = jnp.where(rows >= 0, rows, cache.shape[0])                  # out of range: dropped
    return cache.at[target].set(states.astype(cache.dtype), mode="drop", unique_indices=True)


def initial_states(initial_state, state_indices, has_initial_state, nseq: int, tail: tuple):
    """Every sequence's initial state, float32 [S, *tail]."""
    if state_indices is not None:
        return gather(initial_state, state_indices, has_initial_state)
    if initial_state is not None:
        return initial_state.astype(jnp.float32)
    return jnp.zeros((nseq,) + tuple(tail), jnp.float32)


def finish(finals, initial_state, state_indices, output_final_state: bool, default_dtype=jnp.float32):
    """The op's state result: the updated cache (with `state_indices`), else the final states [S, ...]
    in the dtype of `initial_state` (or `default_dtype`), or None when not asked for."""
    if state_indices is not None:
        return scatter(initial_state, state_indices, finals)
    if not output_final_state:
        return None
    return finals.astype(initial_state.dtype if initial_state is not None else default_dtype)


def step_rows(state_indices, bsz: int):
    """A step form's rows: `state_indices`, default arange(bsz)."""
    return jnp.arange(bsz, dtype=jnp.int32) if state_indices is None else state_indices
