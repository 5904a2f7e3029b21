"""One fused-attention call over [B, H, L, D] views, with its log-sum-exp: on the CPU the flash kernel
that SDPA dispatches to there (called as its aten op, which also returns lse); elsewhere SDPA with
the kernel chosen explicitly (no lse: support.py refuses return_lse there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from portable_attn.torch_features import cpu_flash_shares_kv_heads

# CUDA/ROCm: the fused kernels only, never the math fallback (a bf16 softmax). Other devices: their default.
KERNELS = {"cuda": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)}
NEG = float("-inf")


def attend(q, k, v, *, mask, causal: bool, scale: float, lse: bool):
    """q [B, Hq, L, D], k/v [B, Hkv, K, D] (Hq % Hkv == 0), mask None or bool [B|1, Hq|1, L, K] ->
    o [B, Hq, L, D] and lse [B, Hq, L] float32 (None unless `lse`; a row that sees nothing: o = 0, lse 0
    on the CPU, which the caller sets to -inf)."""
    if 0 in (q.shape[0], q.shape[2], k.shape[2]):  # the CPU kernel divides by these sizes: SIGFPE at 0
        o = q.new_zeros(*q.shape[:-1], v.shape[-1])
        return o, q.new_zeros(q.shape[:-1], dtype=torch.float32) if lse else None
    if q.device.type == "cpu":  # GQA by broadcasting inside the kernel where it does; the mask as a float bias
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # it misreads other strides
        if q.shape[1] != k.shape[1] and not cpu_flash_shares_kv_heads():
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, NEG)
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                          scale=scale)
        return o, (l if lse else None)
    args = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    kernels = KERNELS.get(q.device.type)
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, **args), None
    with sdpa_kernel(list(kernels)):
        return F.scaled_dot_product_attention(q, k, v, **args), None
