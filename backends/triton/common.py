"""What every triton kernel of this backend shares: the interpret flag and the `dot` every kernel calls.

`INTERPRET` is read once, when this module is imported; Triton fixes its mode when a kernel is
decorated, so the flag and the kernels always agree (the backend sets TRITON_INTERPRET before any
kernel module is imported when PORTABLE_ATTN_INTERPRET=1).

The interpreter computes bfloat16 `tl.dot` wrongly (it multiplies the raw 16-bit patterns,
found here): under it, `dot` upcasts its operands to float32 first. A canary test
(tests/backends/triton/test_attention_triton.py) fails once upstream fixes that, so this can go.
It also truncates float32 -> bfloat16 casts, where GPUs round to nearest: a bias of up to one bf16 ulp
per rounding that pushed bf16 results past the tolerance; under it, such casts round to nearest too (a
second canary test watches that).
On a GPU, float32 operands are multiplied at float32 accuracy, as the float32 tolerance needs: on
NVIDIA as three TF32 tensor-core products (`tf32x3`: ~fp32 accuracy, far faster than FMAs, and it
avoids Triton 3.6's failure to lower FMA dots in the paged + block-mask flash kernel), elsewhere in
IEEE float32; PORTABLE_ATTN_TRITON_F32_DOT=ieee|tf32x3 overrides.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from portable_attn import envs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # Triton's own variable

# the same flag as a constexpr global, which jit functions may read
UPCAST_DOT = tl.constexpr(INTERPRET)


def _round_bf16_casts() -> None:
    """The interpreter's float32 -> bfloat16 cast rounds to nearest even, as the GPU's does."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
        high = bits >> np.uint32(16)
        rounded = (bits + np.uint32(0x7FFF) + (high & np.uint32(1))) >> np.uint32(16)  # ties to even
        out = np.where(np.isnan(src.data), high | np.uint32(0x40), rounded)               # NaN stays NaN
        return interpreter.TensorHandle(out.astype(np.uint16), tl.bfloat16)

    builder.cast_impl = cast_impl


if INTERPRET:
    _round_bf16_casts()


def _f32_dot() -> str:
    """The input precision of float32 dots: tf32x3 on NVIDIA, ieee elsewhere (and with no GPU)."""
    if envs.PORTABLE_ATTN_TRITON_F32_DOT:
        return envs.PORTABLE_ATTN_TRITON_F32_DOT
    try:
        return "tf32x3" if triton.runtime.driver.active.get_current_target().backend == "cuda" else "ieee"
    except Exception:  # no GPU driver (the interpreter, or compiling for a target without one)
        return "ieee"


F32_DOT = tl.constexpr("ieee" if INTERPRET else _f32_dot())

LOG2E = 1.4426950408889634
BIG = 1 << 29  # "unbounded" for window sides: p + BIG and p - BIG stay inside int32


def dense(*xs: torch.Tensor | None) -> tuple:
    """The small index and parameter tensors (cu_seqlens, state_indices, sinks, bias, ...) that a kernel
    reads by bare offsets, made contiguous once by the launcher: a strided view would be misread.
    None passes through. Never for caches or states updated in place (their strides are honoured)."""
    return tuple(None if x is None else x.contiguous() for x in xs)


def stride(x: torch.Tensor | None, dim: int) -> int:
    """x.stride(dim) as a kernel's keyword argument; 0 for an absent x (its kernel never reads it) or an
    axis past x's last (a per-head g [T, H] read as [T, H, 1])."""
    return 0 if x is None or dim >= x.dim() else x.stride(dim)


@triton.jit
def dot(a, b):
    """a @ b with float32 accumulation: every tl.dot of this backend goes through here."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=F32_DOT)
    else:
        return tl.dot(a, b)


@triton.jit
def tanh(x):
    """tanh from exp (portable: no vendor libdevice), exact at both ends (+-1 for large |x|)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def softmax_step(sc, valid, v, m_i, l_i, acc):
    """One key block of online softmax (natural base): scores sc [R, N], valid [N], values v [N, DV];
    returns the new (m, l, acc). Rows that have seen nothing keep m = -inf and zeros, never NaN."""
    sc = tl.where(valid[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(sc - m_use[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + dot(p.to(v.dtype), v)


@triton.jit
def join_sink(sink, m_i, l_i, acc):
    """The sink logit [R] joins the denominator only; returns the new (m, l, acc)."""
    m_t = tl.maximum(m_i, sink)
    m_u = tl.where(m_t == float("-inf"), 0.0, m_t)
    a = tl.exp(m_i - m_u)
    return m_t, l_i * a + tl.exp(sink - m_u), acc * a[:, None]


@triton.jit
def finish(m_i, l_i, acc):
    """(o, lse) of an online-softmax state; a row with nothing visible: o = 0, lse = -inf."""
    m_u = tl.where(m_i == float("-inf"), 0.0, m_i)
    z = tl.where(l_i > 0, l_i, 1.0)
    return acc / z[:, None], tl.where(l_i > 0, m_u + tl.log(z), float("-inf"))


@triton.jit
def silu(x):
    """x sigmoid(x), float32."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), float32; log1p(u) = log(1 + u) u / ((1 + u) - 1)
    keeps the small terms that 1 + u rounds away (no vendor libdevice)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    return tl.maximum(x, 0.0) + tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
