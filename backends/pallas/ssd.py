"""Mamba-2 SSD (SPEC `ssd`): the linear-attention kernel (see `linear.run`) with q = C, k = B (grouped
heads), v = d x and the per-head log-decay d A; the state [P, N] is the transposed linear-attention
state [N, P]. The dt transform, the D skip and the silu(z) gate are elementwise and run in XLA around
the kernel, fused with the packing. The step form is jitted pure JAX (a memory-bound rank-1 update
that XLA fuses; a kernel would bring nothing)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import linear, tuning
from .states import finish, gather, initial_states, scatter, step_rows

INF = float("inf")


def _dt(dt, dt_bias, dt_softplus, dt_limit):
    """d = clamp(f(dt + dt_bias), dt_limit), float32 (the clamp always applies)."""
    d = dt.astype(jnp.float32)
    if dt_bias is not None:
        d = d + dt_bias.astype(jnp.float32)
    if dt_softplus:
        d = jnp.logaddexp(d, 0.0)
    return jnp.clip(d, dt_limit[0], dt_limit[1])


def _skip_gate(y, x, D, z):
    """y + D x, times silu(z) when given; float32. D [H] or [H, P] against x [..., H, P]."""
    if D is not None:
        y = y + (D.astype(jnp.float32)[:, None] if D.ndim == 1 else D.astype(jnp.float32)) * x.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
        initial_state=None, output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None):
    return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, state_indices, has_initial_state, cu_seqlens,
                dt_softplus=bool(dt_softplus), dt_limit=tuple(float(a) for a in dt_limit),
                output_final_state=bool(output_final_state), blocks=tuning.recurrent())


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit", "output_final_state", "blocks"))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, state_indices, has_initial_state, cu_seqlens, *,
         dt_softplus, dt_limit, output_final_state, blocks):
    _, h, p = x.shape
    nseq = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    d = _dt(dt, dt_bias, dt_softplus, dt_limit)                                     # [T, H]
    s0 = initial_states(initial_state, state_indices, has_initial_state, nseq, (h, p, B.shape[2]))
    y, finals = linear.run(C, B, d[..., None] * x.astype(jnp.float32), d * A.astype(jnp.float32),
                           jnp.swapaxes(s0, -1, -2), cu_seqlens, blocks, 1.0, jnp.float32)
    y = _skip_gate(y, x, D, z).astype(x.dtype)
    return y, finish(jnp.swapaxes(finals, -1, -2), initial_state, state_indices, output_final_state)


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
             state_indices=None):
    return _step(x, dt, A, B, C, D, z, dt_bias, state, step_rows(state_indices, x.shape[0]),
                 dt_softplus=bool(dt_softplus), dt_limit=tuple(float(a) for a in dt_limit))


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def _step(x, dt, A, B, C, D, z, dt_bias, state, rows, *, dt_softplus, dt_limit):
    h = x.shape[1]
    d = _dt(dt, dt_bias, dt_softplus, dt_limit)                                     # [bsz, H]
    Bh, Ch = (jnp.repeat(t.astype(jnp.float32), h // t.shape[1], axis=1) for t in (B, C))   # [bsz, H, N]
    s = gather(state, rows)                                                         # [bsz, H, P, N]
    s = s * jnp.exp(d * A.astype(jnp.float32))[..., None, None]                     # exp(d A) h
    s = s + (d[..., None] * x.astype(jnp.float32))[..., None] * Bh[..., None, :]    # + d x B^T
    y = jnp.sum(s * Ch[..., None, :], axis=-1)                                      # h C (elementwise: exact f32)
    return _skip_gate(y, x, D, z).astype(x.dtype), scatter(state, rows, s)
