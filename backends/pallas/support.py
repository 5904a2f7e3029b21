"""What the pallas kernels handle, checked before any kernel module (or jax) is imported."""
from __future__ import annotations

from portable_attn.backend import Call

MAX_HEAD_DIM = 256  # one step keeps q, the key and value tiles and the float32 accumulator in VMEM
SUBLANES = 8        # the TPU's (8, 128) tiling (tuning.SUBLANES, without importing jax here)
MAX_STATE_DIM = 512  # chunked recurrences keep ~5 float32 copies of a [K, V] state in VMEM (16 MB scoped on v5e)
CHUNKED = ("linear_attention", "gated_delta_rule", "ssd")


def why_not(call: Call) -> str | None:
    """None when the pallas kernels run this call, else the reason."""
    a = call.args
    if call.op in ("attention", "paged_attention", "sparse_attention"):
        k, v = (a["k_cache"], a["v_cache"]) if call.op == "paged_attention" else (a["k"], a["v"])
        d, dv = k.shape[-1], v.shape[-1]
        if max(d, dv) > MAX_HEAD_DIM:
            return f"head dim {d} (values {dv}) above {MAX_HEAD_DIM}: one step's tiles must fit in VMEM"
        mask = a.get("block_mask")
        if mask is not None:
            bq, bk = mask.block_size
            if bq % SUBLANES or bk % SUBLANES:
                return (f"block mask blocks {bq}x{bk}: the kernel's tiles divide the mask's blocks and are "
                        f"multiples of {SUBLANES} (the TPU's tiling)")
    if call.op in CHUNKED:
        rows, cols = ((a["B"].shape[-1], a["x"].shape[-1]) if call.op == "ssd"
                      else (a["q"].shape[-1], a["v"].shape[-1]))
        if max(rows, cols) > MAX_STATE_DIM:
            return (f"state {rows}x{cols} has a dim above {MAX_STATE_DIM}: the chunk kernel keeps the float32 "
                    f"state and its updates in VMEM")
    if call.op == "write_kv_cache":
        kc = a["k_cache"]
        if kc.shape[0] * kc.shape[1] >= 2 ** 31:
            return "more than 2**31 cache slots (slots are int32 in JAX)"
    return None
