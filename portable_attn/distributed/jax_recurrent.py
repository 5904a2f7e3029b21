"""Sequence-parallel recurrent prefill on a JAX mesh: `jax.shard_map` over a sequence axis (and optionally a
heads axis), run by the pallas backend's ops through the JAX front (`portable_attn.jax`).

The design is `recurrent.py`'s: each device scans its contiguous slice of the packed tokens from a zero
state, the devices combine their affine (M, B) state summaries by a prefix scan over the sequence axis
(`lax.ppermute`: a shift then ceil(log2(n)) rounds, one summary per device per round), and each device
adds what its true incoming state contributes to its outputs. Under `jax.jit` nothing depends on
values: per-device `cu_seqlens` are computed on the host from the global ones, and segment sums replace
`recurrent.py`'s loops over sequences.

Tokens must divide evenly over the sequence axis (shard_map's even shards; pad with an extra sequence
if needed); with `head_axis`, heads and their groups must divide over it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import jax as pj
from .recurrent import split_packed


def _local_cu(mesh, axis: str, cu_seqlens, total: int) -> jax.Array:
    """int32 [n, S+1], row i the cu_seqlens of device i's slice of the tokens, sharded over `axis`."""
    n = mesh.shape[axis]
    if total % n:
        raise ValueError(f"tokens: {total} tokens do not split evenly over the {n} devices of mesh axis {axis!r}")
    cu = None if cu_seqlens is None else torch.from_numpy(np.asarray(cu_seqlens, dtype=np.int64))
    rows = np.stack([p.cu_seqlens.numpy() for p in split_packed(cu, total, n)])
    return jax.device_put(jnp.asarray(rows), NamedSharding(mesh, P(axis)))


def _segments(cu: jax.Array, total: int):
    """(sequence of each token [T], is it its sequence's first token [T], one-hot [T, S] float32)."""
    t = jnp.arange(total)
    seg = jnp.searchsorted(cu[1:], t, side="right")
    return seg, t == cu[seg], (seg[:, None] == jnp.arange(cu.shape[0] - 1)).astype(jnp.float32)


def _cum_decay(log_decay: jax.Array, first: jax.Array) -> jax.Array:
    """exp of the running sums of log-decays [T, H(, K)] inside each sequence (restarting at `first`),
    by a segmented associative scan: never a difference of two long sums."""
    f = first.reshape(first.shape + (1,) * (log_decay.ndim - 1))

    def combine(a, b):
        return jnp.where(b[1], b[0], a[0] + b[0]), a[1] | b[1]

    run, _ = jax.lax.associative_scan(combine, (log_decay.astype(jnp.float32), jnp.broadcast_to(f, log_decay.shape)))
    return jnp.exp(run)


def _apply(M, S, dense: bool):
    return M @ S if dense else M * S


def _prefix(summary: tuple, dense: bool, axis: str, n: int) -> tuple:
    """Exclusive prefix over the mesh axis of affine summaries (M, B): identity on device 0."""
    me = jax.lax.axis_index(axis)
    M, B = summary
    ident = (jnp.broadcast_to(jnp.eye(M.shape[-1], dtype=M.dtype), M.shape) if dense else jnp.ones_like(M),
             jnp.zeros_like(B))

    def compose(e, l):
        return _apply(l[0], e[0], dense), _apply(l[0], e[1], dense) + l[1]

    got = jax.lax.ppermute(summary, axis, [(i, i + 1) for i in range(n - 1)])
    agg = jax.tree.map(lambda i, g: jnp.where(me == 0, i, g), ident, got)
    d = 1
    while d < n:
        got = jax.lax.ppermute(agg, axis, [(i, i + d) for i in range(n - d)])
        agg = jax.tree.map(lambda c, a: jnp.where(me >= d, c, a), compose(got, agg), agg)
        d *= 2
    return agg


def _decay_products(log_decay, seg, S: int, H: int):
    """Diagonal M [S, H, K or 1, 1]: exp of each sequence's summed log-decays (ones without decay); a
    segment sum, as a product with a one-hot matrix would turn -inf decays into NaN."""
    if log_decay is None:
        return jnp.ones((S, H, 1, 1), jnp.float32)
    lg = log_decay.astype(jnp.float32).reshape(log_decay.shape[0], H, -1)
    return jnp.exp(jax.ops.segment_sum(lg, seg, num_segments=S))[..., None]


def _run(mesh, axis, head_axis, body, token_args: dict, shared: dict, state_heads: bool, cu_seqlens):
    """shard_map `body(cu, **local args)` over the mesh; token args split over (axis, head_axis), shared
    args ([H]-shaped parameters over head_axis, the rest replicated). Returns (out, final states)."""
    total = next(iter(token_args.values())).shape[0]
    cu = _local_cu(mesh, axis, cu_seqlens, total)
    tok_spec = {n: P(axis, head_axis) for n in token_args}
    shared_spec = {n: P(None, head_axis) if n == "initial_state" else P(head_axis)    # parameters [H(, P)]
                   for n, v in shared.items() if v is not None}
    names = list(tok_spec) + list(shared_spec)
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in
            zip([token_args[n] for n in tok_spec] + [shared[n] for n in shared_spec],
                list(tok_spec.values()) + list(shared_spec.values()))]

    def local(cu, *xs):
        out, fin = body(cu[0], **dict(zip(names, xs)))
        return out, fin[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), *[tok_spec.get(n) or shared_spec[n] for n in names]),
                       out_specs=(P(axis, head_axis), P(axis, None, head_axis if state_heads else None)),
                       check_vma=False)  # the pallas kernels' outputs carry no mesh-axis annotations
    out, fins = jax.jit(fn)(cu, *args)
    return out, fins[-1]


def linear_attention(mesh, q, k, v, *, g=None, scale=None, initial_state=None, cu_seqlens=None, axis="seq",
                     head_axis=None):
    """Sequence-parallel `portable_attn.jax.linear_attention` over `mesh`.

    `q, k [T, H, K]`, `v [T, H, V]`, `g [T, H(, K)]`: the whole packed batch, split over mesh axis `axis`
    (and its heads over `head_axis`, if given); `cu_seqlens`: host ints [S+1] (NumPy or a list), default
    one sequence; `initial_state [S, H, K, V]` or None. Returns `(out [T, H, V], final_state [S, H, K, V])`,
    float32 final states.
    """
    n = mesh.shape[axis]
    K = q.shape[-1]
    sc = 1.0 / math.sqrt(K) if scale is None else float(scale)
    S = 1 if cu_seqlens is None else len(cu_seqlens) - 1

    def body(cu, q, k, v, g=None, initial_state=None):
        o, B = pj.linear_attention(q, k, v, g=g, scale=sc, output_final_state=True, cu_seqlens=cu)
        seg, first, onehot = _segments(cu, q.shape[0])
        summary = (_decay_products(g, seg, S, q.shape[1]), B)
        Mp, Bp = _prefix(summary, False, axis, n)
        S_in = Bp if initial_state is None else Mp * initial_state.astype(jnp.float32) + Bp
        w = sc * q.astype(jnp.float32)
        if g is not None:
            w = w * _cum_decay(g, first).reshape(q.shape[0], q.shape[1], -1)
        o = (o.astype(jnp.float32) + jnp.einsum("ts,thk,shkv->thv", onehot, w, S_in)).astype(o.dtype)
        return o, summary[0] * S_in + B

    tok = dict(q=q, k=k, v=v) | ({} if g is None else dict(g=g))
    return _run(mesh, axis, head_axis, body, tok, dict(initial_state=initial_state), True, cu_seqlens)


def _ssd_log_decay(dt, A, dt_bias, dt_softplus, dt_limit):
    """d_t A [T, H] in float32, d_t = clamp(f(dt + dt_bias), dt_limit) as docs/spec.md defines it."""
    d = dt.astype(jnp.float32) + (0.0 if dt_bias is None else dt_bias.astype(jnp.float32))
    if dt_softplus:
        d = jnp.logaddexp(d, 0.0)
    return jnp.clip(d, dt_limit[0], dt_limit[1]) * A.astype(jnp.float32)


def ssd(mesh, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
        initial_state=None, cu_seqlens=None, axis="seq", head_axis=None):
    """Sequence-parallel `portable_attn.jax.ssd` over `mesh`: as `linear_attention` above, with
    `x [T, H, P]`, `dt [T, H]`, `B, C [T, G, N]`, `z [T, H, P]` over tokens, `A, D, dt_bias [H]`, states
    `[S, H, P, N]`."""
    n = mesh.shape[axis]
    S = 1 if cu_seqlens is None else len(cu_seqlens) - 1

    def body(cu, x, dt, B, C, A, z=None, D=None, dt_bias=None, initial_state=None):
        y, Bs = pj.ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       output_final_state=True, cu_seqlens=cu)
        log_decay = _ssd_log_decay(dt, A, dt_bias, dt_softplus, dt_limit)
        seg, first, onehot = _segments(cu, x.shape[0])
        summary = (_decay_products(log_decay, seg, S, x.shape[1]), Bs)
        Mp, Bp = _prefix(summary, False, axis, n)
        S_in = Bp if initial_state is None else Mp * initial_state.astype(jnp.float32) + Bp
        Ch = jnp.repeat(C.astype(jnp.float32), x.shape[1] // C.shape[1], axis=1)          # [T, H, N]
        corr = jnp.einsum("ts,shpn,thn->thp", onehot, S_in, Ch) * _cum_decay(log_decay, first)[..., None]
        if z is not None:
            corr = corr * jax.nn.silu(z.astype(jnp.float32))
        return (y.astype(jnp.float32) + corr).astype(y.dtype), summary[0] * S_in + Bs

    tok = dict(x=x, dt=dt, B=B, C=C) | ({} if z is None else dict(z=z))
    shared = dict(A=A, D=D, dt_bias=dt_bias, initial_state=initial_state)
    return _run(mesh, axis, head_axis, body, tok, shared, True, cu_seqlens)


def gated_delta_rule(mesh, q, k, v, g, beta, *, scale=None, initial_state=None, cu_seqlens=None,
                     use_qk_l2norm=False, axis="seq", head_axis=None):
    """Sequence-parallel `portable_attn.jax.gated_delta_rule` over `mesh`: as `linear_attention` above,
    with `v [T, Hv, V]`, `g [T, Hv(, K)]`, `beta [T, Hv]`, states `[S, Hv, K, V]`; one scan on values
    widened to `[v, 0]` from the state `[0, I]` gives the dense transition M (see recurrent.py)."""
    n = mesh.shape[axis]
    S = 1 if cu_seqlens is None else len(cu_seqlens) - 1

    def body(cu, q, k, v, g, beta, initial_state=None):
        T, Hv, V = v.shape
        K = q.shape[-1]
        wide = jnp.zeros((S, Hv, K, V + K), jnp.float32).at[..., V:].set(jnp.eye(K, dtype=jnp.float32))
        ow, fin = pj.gated_delta_rule(q, k, jnp.concatenate([v, jnp.zeros((T, Hv, K), v.dtype)], -1), g, beta,
                                      scale=scale, initial_state=wide, output_final_state=True, cu_seqlens=cu,
                                      use_qk_l2norm=use_qk_l2norm)
        summary = (fin[..., V:], fin[..., :V])                           # M [S, Hv, K, K], B [S, Hv, K, V]
        Mp, Bp = _prefix(summary, True, axis, n)
        S_in = Bp if initial_state is None else Mp @ initial_state.astype(jnp.float32) + Bp
        _, _, onehot = _segments(cu, T)
        corr = jnp.einsum("ts,thm,shmv->thv", onehot, ow[..., V:].astype(jnp.float32), S_in)
        return (ow[..., :V].astype(jnp.float32) + corr).astype(v.dtype), summary[0] @ S_in + summary[1]

    return _run(mesh, axis, head_axis, body, dict(q=q, k=k, v=v, g=g, beta=beta),
                dict(initial_state=initial_state), True, cu_seqlens)
