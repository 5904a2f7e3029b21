"""write_kv_cache on jax arrays: a jitted pure-JAX scatter (no Pallas kernel: XLA's scatter already
writes each row once, in place when the caches are donated). -1, or any slot outside the cache,
writes nothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """(k_cache, v_cache) with token t written at slot `slot_mapping[t]`."""
    nb, bs = k_cache.shape[:2]
    slots = slot_mapping.astype(jnp.int32)
    slots = jnp.where((slots >= 0) & (slots < nb * bs), slots, nb * bs)       # out of range: dropped

    def put(cache, x):
        flat = cache.reshape((nb * bs,) + cache.shape[2:])
        return flat.at[slots].set(x.astype(cache.dtype), mode="drop", unique_indices=True).reshape(cache.shape)

    return put(k_cache, k), put(v_cache, v)
