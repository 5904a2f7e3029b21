"""write_kv_cache through PagedAttention.reshape_and_cache on a heads-major cache."""
from __future__ import annotations

import torch

from .kernels import llm


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    keep = (slot_mapping >= 0).nonzero().flatten()  # the kernel writes a -1 slot out of bounds: drop those tokens
    if keep.numel() == 0:
        return None
    k, v = (x.index_select(0, keep) for x in (k, v))
    slots = slot_mapping.index_select(0, keep).to(torch.int32)
    llm().modules.PagedAttention.reshape_and_cache(k, v, k_cache.transpose(1, 2), v_cache.transpose(1, 2), slots)
    return None
