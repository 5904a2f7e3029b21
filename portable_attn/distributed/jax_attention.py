"""Context-parallel attention on a JAX mesh: `jax.shard_map` over a sequence axis (the zigzag ContextLayout)
and optionally a head axis (tensor parallelism: query and kv heads split in contiguous blocks, which keeps
GQA groups whole), with the pallas backend's ops (`portable_attn.jax`).

Arrays are in mesh order: rank r's tokens (layout.rows(r)) padded to the longest rank's count `Tm`,
ranks one after the other: [world * Tm, heads, dim] (`to_mesh` / `from_mesh`). Per shard: the keys are
all-gathered over the sequence axis (XLA collectives have static shapes, so the exchange is the whole
sequence, unlike the torch path's per-window all-to-all); each chunk attends to its own keys (causal) and,
in a second call, to the keys before it that the window lets it see, gathered (in a first program) through host-planned index
tables picked by the shard's index; `merge_attention_states` joins the two and adds the sinks once.
Causal attention only (windows, softcap, sinks, GQA); block masks are not taken here.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .. import jax as pj
from .context import plan
from .layout import ContextLayout


def padded_tokens(layout: ContextLayout) -> int:
    """Tm: the tokens of the rank holding most, the size of every shard."""
    return max(layout.tokens(r) for r in range(layout.world))


def to_mesh(layout: ContextLayout, x):
    """A global packed array [T, ...] in mesh order [world * Tm, ...] (padding rows are zero)."""
    tm = padded_tokens(layout)
    rows = np.full(layout.world * tm, x.shape[0], np.int64)               # padding reads a zero row
    for r in range(layout.world):
        rows[r * tm:r * tm + layout.tokens(r)] = layout.rows(r).numpy()
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[rows]


def from_mesh(layout: ContextLayout, y, axis: int = 0):
    """The global packed array from mesh order (`axis` 1 for lse [H, world * Tm])."""
    tm = padded_tokens(layout)
    pos = np.concatenate([r * tm + np.arange(layout.tokens(r)) for r in range(layout.world)])
    rows = np.concatenate([layout.rows(r).numpy() for r in range(layout.world)])
    return jnp.take(y, pos[np.argsort(rows)], axis=axis)


def _tables(layout: ContextLayout, left: int) -> tuple:
    """Per-shard index tables, stacked [world, ...] (int32), and E (query rows per chunk in the second call)."""
    world, tm = layout.world, padded_tokens(layout)
    needs = plan(layout, causal=True, window_size=(left, 0), merged=True)
    lens = [[min(n.chunk.length, left) if left >= 0 else n.chunk.length for n in rn] for rn in needs]
    e = max((m for rl in lens for m in rl), default=0)
    bmax = max(sum(n.k1 - n.k0 for n in rn) for rn in needs)
    cu_loc, qidx, bidx, bcu = [], [], [], []
    for r, rn in enumerate(needs):
        cu = np.cumsum([0] + [n.chunk.length for n in rn])
        cu_loc.append(np.append(cu, tm))                                  # padding rows: one more sequence
        slots = np.full(len(rn) * e, tm)                                   # unused query slots: scratch row tm
        for i, (n, m) in enumerate(zip(rn, lens[r])):
            slots[i * e:i * e + m] = np.arange(n.chunk.row, n.chunk.row + m)
        qidx.append(slots)
        keys = [np.full(0, 0)]
        for n in rn:
            owner, row = layout.owners[n.chunk.seq]
            keys.append(owner[n.k0:n.k1] * tm + row[n.k0:n.k1])
        keys = np.concatenate(keys)
        bidx.append(np.concatenate([keys, np.full(bmax - len(keys), world * tm)]))   # padding: the zero row
        bcu.append(np.append(np.cumsum([0] + [n.k1 - n.k0 for n in rn]), bmax))
    stack = lambda xs: jnp.asarray(np.stack(xs).astype(np.int32))  # noqa: E731
    return stack(cu_loc), stack(qidx), stack(bidx), stack(bcu), e


def context_attention(q, k, v, layout: ContextLayout, mesh, *, seq_axis="seq", head_axis=None, window_size=(-1, 0),
                      softcap=0.0, sinks=None, softmax_scale=None, return_lse=False):
    """Causal `attention` of a packed batch in mesh order (see `to_mesh`) over `mesh`'s `seq_axis` (and
    `head_axis`, which splits q, k, v heads and sinks). Returns `o [world * Tm, Hq, Dv]` in mesh order
    (and `lse [Hq, world * Tm]`); `from_mesh` gives the global packed result, equal to `attention`'s."""
    left, right = window_size
    if right not in (0, -1):
        raise ValueError(f"window_size: causal attention sees no key to the right; expected right 0 or -1, got "
                         f"{window_size}")
    if mesh.shape[seq_axis] != layout.world:
        raise ValueError(f"layout: built for {layout.world} ranks, mesh axis {seq_axis!r} has {mesh.shape[seq_axis]}")
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    tables = _tables(layout, left)
    heads = P(seq_axis, head_axis, None)
    # two programs: the key exchange (XLA collectives only), then the kernels (no collectives), as programs
    # mixing both deadlocked intermittently in Pallas' interpret mode on a fake CPU mesh
    kv = jax.jit(jax.shard_map(functools.partial(_gather, bidx=tables[2], seq_axis=seq_axis), mesh=mesh,
                               in_specs=(heads,) * 2, out_specs=(heads,) * 2))(k, v)
    fn = functools.partial(_shard, tables=tables, seq_axis=seq_axis, left=left, softcap=softcap, scale=scale)
    out_specs = (heads, P(head_axis, seq_axis))
    args = (q, k, v) + kv + (() if sinks is None else (sinks,))
    # check_vma=False: the pallas kernels' outputs carry no varying-axes annotation
    o, lse = jax.jit(jax.shard_map(lambda *a: fn(*a[:5], a[5] if len(a) > 5 else None), mesh=mesh,
                                   in_specs=(heads,) * 5 + (() if sinks is None else (P(head_axis),)),
                                   out_specs=out_specs, check_vma=False))(*args)
    return (o, lse) if return_lse else o


def _zero_row(x):
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


def _gather(k, v, *, bidx, seq_axis):
    """One shard's key buffers [Bmax, hkv, *]: the keys before each of its chunks, from every shard's keys."""
    r = jax.lax.axis_index(seq_axis)
    return tuple(_zero_row(jax.lax.all_gather(x, seq_axis, tiled=True))[bidx[r]] for x in (k, v))


def _shard(q, k, v, kb, vb, sinks, *, tables, seq_axis, left, softcap, scale):
    """One shard: q [Tm, hq, D], k/v [Tm, hkv, *] of this rank, kb/vb its key buffers."""
    cu_loc, qidx, bidx, bcu, e = tables
    r = jax.lax.axis_index(seq_axis)
    tm = q.shape[0]
    opts = dict(softcap=softcap, softmax_scale=scale, return_lse=True)
    o_diag, lse_diag = pj.attention(q, k, v, cu_seqlens_q=cu_loc[r], cu_seqlens_k=cu_loc[r], causal=True,
                                    window_size=(left, 0), **opts)
    o_rem = jnp.zeros_like(o_diag)
    lse_rem = jnp.full(lse_diag.shape, -jnp.inf, jnp.float32)
    if e and bidx.shape[1]:
        n = qidx.shape[1] // e
        cu_q = jnp.append(jnp.arange(n + 1, dtype=jnp.int32) * e, n * e)   # the keys' padding: no queries
        o_p, lse_p = pj.attention(_zero_row(q)[qidx[r]], kb, vb, cu_seqlens_q=cu_q, cu_seqlens_k=bcu[r],
                                  window_size=(left - e if left >= 0 else -1, -1), **opts)
        o_rem = _zero_row(o_rem).at[qidx[r]].set(o_p)[:tm]
        lse_rem = jnp.concatenate([lse_rem, lse_rem[:, :1]], 1).at[:, qidx[r]].set(lse_p)[:, :tm]
    return pj.merge_attention_states(o_diag, lse_diag, o_rem, lse_rem, sinks=sinks, return_lse=True)
