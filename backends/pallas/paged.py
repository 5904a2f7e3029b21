"""paged_attention on jax arrays: the flash kernel with keys read through the block table, `Lk =
seqused_k[s]` (decode: one query per sequence). Pages that fit the TPU tiling are read in place."""
from __future__ import annotations

import jax.numpy as jnp

from . import flash


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, table=None):
    if cu_seqlens_q is None:  # decode: query i is sequence i's only one
        cu_seqlens_q = jnp.arange(block_table.shape[0] + 1, dtype=jnp.int32)
        max_seqlen_q = 1
    return flash.forward(q, cu_seqlens_q, jnp.diff(cu_seqlens_q), seqused_k,
                         flash.Keys(k_cache, v_cache, table=block_table), causal=causal, window_size=window_size,
                         softcap=softcap, sinks=sinks, softmax_scale=softmax_scale, block_mask=block_mask,
                         return_lse=return_lse, max_q=max_seqlen_q, max_k=max_seqlen_k, table=table)
