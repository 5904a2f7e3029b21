"""What the triton kernels handle, checked on the host before any kernel module is imported."""
from __future__ import annotations

import torch

from portable_attn.backend import Call

HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)  # padded to the next power of two inside the kernels
MAX_HEAD_DIM = 256  # flash kernel (attention, paged_attention): any D, Dv in 1..256, padded to a power of two


def why_not(call: Call) -> str | None:
    """None when the triton kernels run this call, else the reason."""
    if call.dtype == torch.float64:
        return "float64 is the reference's job (use backend='reference')"
    if call.op in ("attention", "paged_attention"):
        return _flash_reason(call)
    if call.op == "sparse_attention":
        return _sparse_reason(call)
    return None  # write_kv_cache: any shape, block size, strides and slot dtype (int32/int64)


def _flash_reason(call: Call) -> str | None:
    """attention / paged_attention (flash.py). Any block-mask block size tiles: kernel tiles are
    matched to the mask's blocks on the host, so there is no block-size limit to report."""
    a = call.args
    k, v = (a["k"], a["v"]) if call.op == "attention" else (a["k_cache"], a["v_cache"])
    d, dv = k.shape[-1], v.shape[-1]
    if max(d, dv) > MAX_HEAD_DIM:
        return (f"head dim {d} (values {dv}) above {MAX_HEAD_DIM}: one query tile keeps q and the output "
                f"accumulator in registers")
    return None


def _sparse_reason(call: Call) -> str | None:
    """sparse_attention (sparse.py): any topk, any GQA ratio (large groups are split over programs)."""
    d, dv = call.args["k"].shape[-1], call.args["v"].shape[-1]
    if max(d, dv) > MAX_HEAD_DIM:
        return (f"head dim {d} (values {dv}) above {MAX_HEAD_DIM}: one tile keeps q and the output "
                f"accumulator in registers")
    return None
