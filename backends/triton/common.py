"""What every triton kernel of this backend shares: the interpret flag and the `dot` every kernel calls.

`INTERPRET` is read once, when this module is imported; Triton fixes its mode when a kernel is
decorated, so the flag and the kernels always agree (the backend sets TRITON_INTERPRET before any
kernel module is imported when PORTABLE_ATTN_INTERPRET=1).

The interpreter computes bfloat16 `tl.dot` wrongly (it multiplies the raw 16-bit patterns; see
PITFALLS.md): under it, `dot` upcasts its operands to float32 first. A canary test
(tests/backends/triton/test_attention_triton.py) fails once upstream fixes that, so this can go.
On a GPU, float32 operands are multiplied in IEEE float32 (no TF32), as the float32 tolerance needs.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# the same flag as a constexpr global, which jit functions may read
UPCAST_DOT = tl.constexpr(INTERPRET)

LOG2E = 1.4426950408889634
BIG = 1 << 29  # "unbounded" for window sides: p + BIG and p - BIG stay inside int32


@triton.jit
def dot(a, b):
    """a @ b with float32 accumulation: every tl.dot of this backend goes through here."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
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
