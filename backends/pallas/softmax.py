"""Online-softmax pieces shared by the flash and top-k kernels (float32, [rows, ...] values)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NT = (((1,), (1,)), ((), ()))   # a @ b.T
NN = (((1,), (0,)), ((), ()))   # a @ b


def dot(a, b, dims):
    """A matmul on the MXU with float32 accumulation (float32 inputs at full precision)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scores(q, k, scale, softcap=None):
    """scale * q @ k.T, soft-capped unless `softcap` is None: [rows, keys] float32."""
    s = dot(q, k, NT) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


def update(s, visible, v, m_prev, l_prev, acc_prev):
    """One online-softmax step over keys `s` [rows, keys] (masked by `visible`) and values `v`.
    m_prev, l_prev [rows, 1]; returns the new (m, l, acc). Rows that saw nothing keep m = -inf."""
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - safe)
    alpha = jnp.exp(m_prev - safe)
    l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
    acc = alpha * acc_prev + dot(p.astype(v.dtype), v, NN)
    return m_new, l_new, acc


def finish(m, l, acc, sink=None):
    """(o, lse) from the running max, sum and accumulator; a sink logit joins the denominator only.
    A row with nothing visible gives o = 0 and lse = -inf (or the sink)."""
    if sink is not None:
        top = jnp.maximum(m, sink)
        safe = jnp.where(top == -jnp.inf, 0.0, top)   # no key and a -inf sink: o = 0, lse = -inf
        scale = jnp.exp(m - safe)
        l = l * scale + jnp.exp(sink - safe)
        acc = acc * scale
        m = top
    o = acc / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return o, lse
