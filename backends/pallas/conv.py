"""Causal depthwise conv1d (SPEC `causal_conv1d`), jitted pure JAX: W shifted gathers of the packed
tokens and a weighted sum, which XLA fuses into one memory-bound pass; a Pallas kernel would bring
nothing. Each sequence reads as its W-1 state columns followed by its tokens."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .states import finish, gather, initial_states, scatter, step_rows


def _act(y, bias, activation):
    """act(y + bias) for y [..., C], float32."""
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return jax.nn.silu(y) if activation == "silu" else y


def _joint(x, states, cu, seq, p):
    """Column p [..] of each sequence's joint row (W-1 state columns, then its tokens), float32 [.., C]:
    p < W-1 reads the state, else token cu[seq] + p - (W-1). seq, p int32 of one shape."""
    w = states.shape[2]
    t = jnp.clip(cu[seq] + p - w, 0, max(x.shape[0] - 1, 0))
    from_x = jnp.take(x, t, axis=0, mode="clip").astype(jnp.float32) if x.shape[0] else 0.0
    from_s = states[seq, :, jnp.clip(p, 0, max(w - 1, 0))] if w else 0.0
    return jnp.where((p >= w)[..., None], from_x, from_s)


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None):
    return _conv(x, weight, bias, initial_state, state_indices, has_initial_state, cu_seqlens,
                 activation=activation, output_final_state=bool(output_final_state))


@functools.partial(jax.jit, static_argnames=("activation", "output_final_state"))
def _conv(x, weight, bias, initial_state, state_indices, has_initial_state, cu_seqlens, *, activation,
          output_final_state):
    n_tok, ch = x.shape
    w = weight.shape[1] - 1                                                   # state width W-1
    cu = jnp.array([0, n_tok], jnp.int32) if cu_seqlens is None else cu_seqlens.astype(jnp.int32)
    nseq = cu.shape[0] - 1
    states = initial_states(initial_state, state_indices, has_initial_state, nseq, (ch, w))   # [S, C, W-1]
    t = jnp.arange(n_tok, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)        # the sequence of each token
    p = t - cu[seq] + w                                                       # its joint-row column
    wf = weight.astype(jnp.float32)
    y = sum(wf[:, i] * _joint(x, states, cu, seq, p - w + i) for i in range(w + 1))   # [T, C]
    y = _act(y, bias, activation).astype(x.dtype)
    # the final state: the last W-1 columns of each sequence's joint row
    lens = cu[1:] - cu[:-1]
    cols = lens[:, None] + jnp.arange(w, dtype=jnp.int32)                     # [S, W-1]
    seqs = jnp.broadcast_to(jnp.arange(nseq, dtype=jnp.int32)[:, None], cols.shape)
    finals = jnp.swapaxes(_joint(x, states, cu, seqs, cols), 1, 2)            # [S, C, W-1]
    return y, finish(finals, initial_state, state_indices, output_final_state, x.dtype)


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None):
    return _step(x, weight, bias, state, step_rows(state_indices, x.shape[0]), activation=activation)


@functools.partial(jax.jit, static_argnames=("activation",))
def _step(x, weight, bias, state, rows, *, activation):
    window = jnp.concatenate([gather(state, rows), x.astype(jnp.float32)[..., None]], axis=-1)   # [bsz, C, W]
    y = _act(jnp.sum(window * weight.astype(jnp.float32), axis=-1), bias, activation)
    return y.astype(x.dtype), scatter(state, rows, window[..., 1:])
