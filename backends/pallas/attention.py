"""attention on jax arrays: packed varlen sequences through the flash kernel (flash.py)."""
from __future__ import annotations

import jax.numpy as jnp

from . import flash


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, table=None):
    if cu_seqlens_q is None:  # one sequence
        cu_seqlens_q = jnp.array([0, q.shape[0]], jnp.int32)
        cu_seqlens_k = jnp.array([0, k.shape[0]], jnp.int32)
        max_seqlen_q, max_seqlen_k = q.shape[0], k.shape[0]
    lq = jnp.diff(cu_seqlens_q)
    lk = jnp.diff(cu_seqlens_k)
    return flash.forward(q, cu_seqlens_q, lq, lk, flash.Keys(k, v, start=cu_seqlens_k[:-1]), causal=causal,
                         window_size=window_size, softcap=softcap, sinks=sinks, softmax_scale=softmax_scale,
                         block_mask=block_mask, return_lse=return_lse, max_q=max_seqlen_q, max_k=max_seqlen_k,
                         table=table)
