"""write_kv_cache as one indexed assignment per cache (torch's index_put kernel), in place on any strides."""
from __future__ import annotations


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    keep = (slot_mapping >= 0).nonzero().flatten()  # -1: padding, not written
    slots = slot_mapping.index_select(0, keep).long()
    block, offset = slots // k_cache.shape[1], slots % k_cache.shape[1]
    k_cache[block, offset] = k.index_select(0, keep)
    v_cache[block, offset] = v.index_select(0, keep)
