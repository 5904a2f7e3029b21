"""sparse_attention on jax arrays (top-k / index-selected keys, DeepSeek DSA, NSA's selection branch).

XLA gathers the listed keys of every (query, kv head) into `[Hkv, Tq, topk, Dp]` (a listed position
outside [0, Lk) of the query's sequence, or -1, is invisible and reads row 0 of its sequence instead);
the kernel, grid (kv heads, query tiles), runs each query's softmax over its `topk` keys with the query
heads of the group as the rows of one [G, topk] score tile. O(Tq * topk * D) work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import compat, softmax, tuning
from .compat import pl, pltpu
from .tuning import LANES, round_up


def _kernel(scale, softcap, bt, q_ref, k_ref, v_ref, vis_ref, sink_ref, o_ref, lse_ref):
    def one(i, carry):
        s = softmax.scores(q_ref[i], k_ref[i], scale, softcap or None)                 # [G, topk]
        visible = jnp.broadcast_to(vis_ref[pl.ds(i, 1), :] != 0, s.shape)
        init = jnp.full((s.shape[0], 1), -jnp.inf, jnp.float32)
        m, l, acc = softmax.update(s, visible, v_ref[i], init, jnp.zeros_like(init),
                                   jnp.zeros((s.shape[0], v_ref.shape[2]), jnp.float32))
        o, lse = softmax.finish(m, l, acc, sink_ref[...][:, :1])
        o_ref[i] = o.astype(o_ref.dtype)
        lse_ref[i] = jnp.broadcast_to(lse, lse_ref.shape[1:])
        return carry

    jax.lax.fori_loop(0, bt, one, 0)


def call(q_g, k_sel, v_sel, visible, sinks, *, scale: float, softcap: float, bt: int):
    """q_g [Hkv, Tp, G, Dp], k_sel [Hkv, Tp, K, Dp], v_sel [Hkv, Tp, K, Dvp], visible int32 [Hkv, Tp, K],
    sinks [Hkv, G, 128] -> o [Hkv, Tp, G, Dvp], lse [Hkv, Tp, G, 128]."""
    hkv, tp, g, dp = q_g.shape
    topk, dvp = k_sel.shape[2], v_sel.shape[3]

    def tile(h, i):
        return h, i, 0, 0

    return pl.pallas_call(
        functools.partial(_kernel, scale, softcap, bt), grid=(hkv, tp // bt),
        in_specs=[pl.BlockSpec((None, bt, g, dp), tile), pl.BlockSpec((None, bt, topk, dp), tile),
                  pl.BlockSpec((None, bt, topk, dvp), tile), pl.BlockSpec((None, bt, topk), lambda h, i: (h, i, 0)),
                  pl.BlockSpec((None, g, LANES), lambda h, i: (h, 0, 0))],
        out_specs=[pl.BlockSpec((None, bt, g, dvp), tile), pl.BlockSpec((None, bt, g, LANES), tile)],
        out_shape=[jax.ShapeDtypeStruct((hkv, tp, g, dvp), q_g.dtype),
                   jax.ShapeDtypeStruct((hkv, tp, g, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=compat.interpret(), name="portable_attn_topk")(q_g, k_sel, v_sel, visible, sinks)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "return_lse", "bt"))
def _run(q, k, v, indices, cu_q, cu_k, sinks, *, scale, softcap, return_lse, bt):
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    g, topk = hq // hkv, indices.shape[2]
    tp, dp, dvp = round_up(max(tq, 1), bt), round_up(d, LANES), round_up(dv, LANES)
    kp = max(round_up(topk, 8), 8)                          # topk = 0: one tile of -1 slots, nothing visible
    t = jnp.arange(tq, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(cu_q[1:], t, side="right"), 0, cu_q.shape[0] - 2)
    start, lk = cu_k[s], cu_k[s + 1] - cu_k[s]
    idx = jnp.pad(indices, ((0, tp - tq), (0, 0), (0, kp - topk)), constant_values=-1)   # [Tp, Hkv, K]
    start, lk = jnp.pad(start, (0, tp - tq)), jnp.pad(lk, (0, tp - tq))
    visible = (idx >= 0) & (idx < lk[:, None, None])
    rows = jnp.clip(start[:, None, None] + jnp.where(visible, idx, 0), 0, max(tk - 1, 0))
    heads = jnp.arange(hkv)[None, :, None]

    def pick(x, width):                                     # [Tk, Hkv, F] -> [Hkv, Tp, K, width]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[2])))
        return jnp.where(visible[..., None], x[rows, heads], 0).transpose(1, 0, 2, 3)

    q_g = jnp.pad(q, ((0, tp - tq), (0, 0), (0, dp - d))).reshape(tp, hkv, g, dp).transpose(1, 0, 2, 3)
    sink = jnp.full((hq,), -jnp.inf, jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    sink = jnp.broadcast_to(sink.reshape(hkv, g, 1), (hkv, g, LANES))
    o, lse = call(q_g, pick(k, dp), pick(v, dvp), visible.transpose(1, 0, 2).astype(jnp.int32), sink,
                  scale=scale, softcap=softcap, bt=bt)
    o = o.transpose(1, 0, 2, 3).reshape(tp, hq, dvp)[:tq, :, :dv]
    lse = lse[..., 0].transpose(0, 2, 1).reshape(hq, tp)[:, :tq]
    return (o, lse) if return_lse else o


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, table=None):
    if q.shape[0] == 0:
        o = jnp.zeros(q.shape[:2] + (v.shape[2],), q.dtype)
        return (o, jnp.full((q.shape[1], 0), -jnp.inf, jnp.float32)) if return_lse else o
    if cu_seqlens_q is None:
        cu_seqlens_q = jnp.array([0, q.shape[0]], jnp.int32)
        cu_seqlens_k = jnp.array([0, k.shape[0]], jnp.int32)
    if k.shape[0] == 0:  # nothing to gather from: one zero row, never visible
        k, v = jnp.zeros((1,) + k.shape[1:], k.dtype), jnp.zeros((1,) + v.shape[1:], v.dtype)
    bt = (table or tuning.attention()).sparse_queries
    return _run(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, sinks, scale=float(softmax_scale),
                softcap=float(softcap), return_lse=return_lse, bt=bt)
