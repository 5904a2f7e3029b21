"""merge_attention_states, jitted pure JAX: two weighted reads and one write per element, which XLA fuses
into one memory-bound pass; a Pallas kernel would bring nothing. An empty part (lse -inf) is not read."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks=None, return_lse=False):
    o, lse = _merge(o_a, lse_a, o_b, lse_b, sinks)
    return (o, lse) if return_lse else o


def _weighted(o, lse, total):
    """o [T, H, Dv] times exp(lse - total) [H, T], float32; 0 where the part saw nothing."""
    w = jnp.where(lse > -jnp.inf, jnp.exp(lse - total), 0.0).T[..., None]
    return jnp.where(w > 0, w * o.astype(jnp.float32), 0.0)


@jax.jit
def _merge(o_a, lse_a, o_b, lse_b, sinks):
    la, lb = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
    lse = jnp.logaddexp(la, lb)                                               # [H, T]
    if sinks is not None:
        lse = jnp.logaddexp(lse, sinks.astype(jnp.float32)[:, None])
    total = jnp.where(lse > -jnp.inf, lse, 0.0)
    o = _weighted(o_a, la, total) + _weighted(o_b, lb, total)
    return o.astype(o_a.dtype), lse


