"""What the triton kernels handle, checked on the host before any kernel module is imported."""
from __future__ import annotations

from portable_attn.backend import Call

HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)  # padded to the next power of two inside the kernels
CHUNKED = ("linear_attention", "gated_delta_rule", "ssd")  # the chunked sequence forms (chunk.py)
MAX_HEAD_DIM = 256  # flash kernel (attention, paged_attention): any D, Dv in 1..256, padded to a power of two
MAX_STEP_KEYS = 256  # step kernels (steps.py): a program holds every key dim of its state tile
MAX_CONV_WIDTH = 256  # causal_conv1d_step (conv.py): a program holds its channels' whole window


def why_not(call: Call) -> str | None:
    """None when the triton kernels run this call, else the reason."""
    if call.op in ("attention", "paged_attention"):
        return _flash_reason(call)
    if call.op == "sparse_attention":
        return _sparse_reason(call)
    if call.op in CHUNKED:
        return _chunked_reason(call)
    if call.op in ("linear_attention_step", "gated_delta_rule_step", "ssd_step", "causal_conv1d",
                   "causal_conv1d_step"):
        return _step_conv_reason(call)
    return None  # write_kv_cache, merge_attention_states: any shape, strides (and slot dtype, int32/int64)


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


def _step_conv_reason(call: Call) -> str | None:
    """Step forms (steps.py) and causal_conv1d (conv.py): any value dim (tiled), any batch, any cache."""
    a = call.args
    if call.op.startswith("causal_conv1d"):
        w = a["weight"].shape[1]
        if w > MAX_CONV_WIDTH:
            return f"kernel width W = {w} above {MAX_CONV_WIDTH}: a step program keeps the whole window in registers"
        return None
    keys = a["B"].shape[2] if call.op == "ssd_step" else a["q"].shape[2]
    if keys > MAX_STEP_KEYS:
        return (f"state key dim {keys} above {MAX_STEP_KEYS}: a step program keeps every key dim of its state "
                f"tile in registers")
    return None


def _chunked_reason(call: Call) -> str | None:
    """linear_attention, ssd: any head dims (key and value dims are split over programs and loops).
    gated_delta_rule: the state pass holds the whole key dim of its state tile (v_new = u - w S contracts it)."""
    if call.op == "gated_delta_rule":
        keys = call.args["q"].shape[2]
        if keys > MAX_HEAD_DIM:
            return (f"key dim K = {keys} above {MAX_HEAD_DIM}: the delta rule's state pass keeps every key dim "
                    f"of its state tile in registers")
    return None
