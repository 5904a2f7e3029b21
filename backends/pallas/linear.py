"""Linear attention and GLA (SPEC `linear_attention`): a Pallas kernel over chunks (see `chunk`).
The step form is jitted pure JAX: one token per sequence is a memory-bound rank-1 update that XLA
fuses; a kernel would bring nothing."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import chunk as ch
from . import tuning
from .states import finish, gather, initial_states, scatter, step_rows


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None):
    return _linear_attention(q, k, v, g, initial_state, state_indices, has_initial_state, cu_seqlens,
                             scale=float(scale), output_final_state=bool(output_final_state),
                             blocks=tuning.recurrent())


@functools.partial(jax.jit, static_argnames=("scale", "output_final_state", "blocks"))
def _linear_attention(q, k, v, g, initial_state, state_indices, has_initial_state, cu_seqlens, *, scale,
                      output_final_state, blocks):
    nseq = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    s0 = initial_states(initial_state, state_indices, has_initial_state, nseq, (q.shape[1], q.shape[2], v.shape[2]))
    y, finals = run(q, k, v, g, s0, cu_seqlens, blocks, scale, q.dtype)
    return y, finish(finals, initial_state, state_indices, output_final_state)


def run(q, k, v, g, s0, cu_seqlens, blocks: tuning.Recurrent, scale: float, out_dtype):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t over packed sequences (shared with SSD).
    q, k [T, Hg, K] (grouped: head h reads h // (H // Hg)); v [T, H, V]; g None, [T, H] or [T, H, K];
    s0 float32 [S, H, K, V]. Returns o [T, H, V] in out_dtype and the final states float32 [S, H, K, V]."""
    n_tok, heads, vd = v.shape
    kd = q.shape[2]
    c = blocks.chunk
    tab = ch.table(n_tok, cu_seqlens, c)
    kind, g_tokens, g_chunks = ch.decay_inputs(g, tab, c)

    def body(toks, chunks, s):
        q_ref, k_ref, v_ref, *g_ref = toks
        decay = ch.Decay(kind, (*g_ref, *chunks), blocks.sub)
        qc = q_ref[...].astype(jnp.float32) * scale
        kc, vc = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
        (a,) = decay.scores([qc], kc)                                           # [C, C]
        o = ch.dot(a, vc) + ch.dot(decay.from_start(qc), s)
        return o, decay.whole(s) + ch.dot_tn(decay.to_end(kc), vc)

    o, finals = ch.sweep(body, tab, c, heads, [ch.tokens(x, tab) for x in (q, k, v)] + g_tokens, g_chunks,
                         ch.pad_last(s0, kd, vd), out_dtype)
    return ch.untokens(o, tab, vd), finals[:, :, :kd, :vd]


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None):
    return _step(q, k, v, g, state, step_rows(state_indices, q.shape[0]), scale=float(scale))


@functools.partial(jax.jit, static_argnames=("scale",))
def _step(q, k, v, g, state, rows, *, scale):
    s = gather(state, rows)                                                     # [bsz, H, K, V]
    if g is not None:
        a = jnp.exp(g.astype(jnp.float32))
        s = s * (a[..., None, None] if a.ndim == 2 else a[..., None])          # diag(exp(g_t)) S
    s = s + k.astype(jnp.float32)[..., None] * v.astype(jnp.float32)[..., None, :]
    y = scale * jnp.sum(q.astype(jnp.float32)[..., None] * s, axis=-2)          # q_t S_t (elementwise: exact f32)
    return y.astype(q.dtype), scatter(state, rows, s)
