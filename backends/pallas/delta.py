"""The gated delta rule (SPEC `gated_delta_rule`; KDA with per-key-dim g): a Pallas kernel over chunks
(see `chunk`) in the WY/UT form. The step form is jitted pure JAX (a memory-bound rank-1 update per
token that XLA fuses; a kernel would bring nothing).

In a chunk entered with state S_0: u_t = beta_t (v_t - exp(G_t) S_0^T k_t - sum_{j<t} A_tj u_j),
A_tj = exp(G_t - G_j) k_t.k_j, so (I + beta A) u = beta v - beta exp(G) k S_0 and u = U - W S_0 with
U, W from T = (I + beta A)^-1 (unit lower triangular, `chunk.unit_lower_inverse`);
o = q exp(G) S_0 + A_qk u, S_C = exp(G_C) S_0 + (k exp(G_C - G))^T u."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import chunk as ch
from . import tuning
from .states import finish, gather, initial_states, scatter, step_rows


def _l2norm(x):
    """x rsqrt(sum x^2 + 1e-6) over the last axis, float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False):
    return _gated_delta_rule(q, k, v, g, beta, initial_state, state_indices, has_initial_state, cu_seqlens,
                             scale=float(scale), output_final_state=bool(output_final_state),
                             use_qk_l2norm=bool(use_qk_l2norm), blocks=tuning.recurrent())


@functools.partial(jax.jit, static_argnames=("scale", "output_final_state", "use_qk_l2norm", "blocks"))
def _gated_delta_rule(q, k, v, g, beta, initial_state, state_indices, has_initial_state, cu_seqlens, *, scale,
                      output_final_state, use_qk_l2norm, blocks):
    n_tok, hv, vd = v.shape
    kd = q.shape[2]
    c, sub = blocks.chunk, blocks.sub
    nseq = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    s0 = initial_states(initial_state, state_indices, has_initial_state, nseq, (hv, kd, vd))
    tab = ch.table(n_tok, cu_seqlens, c)
    kind, g_tokens, g_chunks = ch.decay_inputs(g, tab, c)

    def body(toks, chunks, s):
        q_ref, k_ref, v_ref, beta_ref, g_ref = toks
        decay = ch.Decay(kind, (g_ref, *chunks), sub)
        qc, kc = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
        if use_qk_l2norm:
            qc, kc = _l2norm(qc), _l2norm(kc)
        qc = qc * scale
        vc, b = v_ref[...].astype(jnp.float32), beta_ref[...].astype(jnp.float32)     # [C, Vp], [C, 1]
        aqk, akk = decay.scores([qc, kc], kc)
        below = ch.iota(akk.shape, 1) < ch.iota(akk.shape, 0)                         # j < i
        t = ch.unit_lower_inverse(jnp.where(below, akk, 0.0) * b)                      # (I + beta A)^-1
        w = ch.dot(t, decay.from_start(b * kc))
        u = ch.dot(t, b * vc) - ch.dot(w, s)                                            # U - W S_0
        o = ch.dot(decay.from_start(qc), s) + ch.dot(aqk, u)
        return o, decay.whole(s) + ch.dot_tn(decay.to_end(kc), u)

    toks = [ch.tokens(x, tab) for x in (q, k, v, beta)] + g_tokens
    o, finals = ch.sweep(body, tab, c, hv, toks, g_chunks, ch.pad_last(s0, kd, vd), v.dtype)
    return ch.untokens(o, tab, vd), finish(finals[:, :, :kd, :vd], initial_state, state_indices, output_final_state)


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False):
    return _step(q, k, v, g, beta, state, step_rows(state_indices, q.shape[0]), scale=float(scale),
                 use_qk_l2norm=bool(use_qk_l2norm))


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm"))
def _step(q, k, v, g, beta, state, rows, *, scale, use_qk_l2norm):
    hv = v.shape[1]
    q, k = (_l2norm(q), _l2norm(k)) if use_qk_l2norm else (q.astype(jnp.float32), k.astype(jnp.float32))
    q, k = (jnp.repeat(x, hv // x.shape[1], axis=1) for x in (q, k))            # [bsz, Hv, K]
    s = gather(state, rows)                                                     # [bsz, Hv, K, V]
    a = jnp.exp(g.astype(jnp.float32))
    s = s * (a[..., None, None] if a.ndim == 2 else a[..., None])               # S' = diag(exp(g_t)) S
    u = beta.astype(jnp.float32)[..., None] * (v.astype(jnp.float32) - jnp.sum(k[..., None] * s, axis=-2))
    s = s + k[..., None] * u[..., None, :]                                      # S' + k u^T
    y = scale * jnp.sum(q[..., None] * s, axis=-2)
    return y.astype(v.dtype), scatter(state, rows, s)
