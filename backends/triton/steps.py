"""Step forms (one decode token per sequence) of linear_attention, gated_delta_rule and ssd: one launch
of one kernel for the whole batch, grid (bsz, value heads, value blocks).

A program holds the state tile [K, BLOCK_V] of cache row `state_indices[b]` in float32 (every key dim,
since the output and the delta correction sum over K), reads it once, updates it and writes it back in
place in the cache's dtype, through the cache's strides. A row of -1 (or, with checks off, any row
outside the cache) starts from zero and is never written. Constexpr switches pick the op:
- linear attention: S = diag(exp(g)) S + k^T v, o = scale q S (g per head, per key dim, or none);
- gated delta rule: u = beta (v - S'^T k) replaces v (q/k heads H serve Hv value heads);
- ssd: the linear-attention step with q = C, k = d B, v = x, log-decay d A, on the state [P, N] read
  as its transpose [N, P] (swapped strides), then y + D x and y silu(z); d = clamp(f(dt + dt_bias)).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import clamp, dense, silu, softplus, stride
from .tuning import recurrent

TILE = 8192  # most state elements one program holds (float32 registers)
NO_DECAY, HEAD_DECAY, KEY_DECAY = 0, 1, 2


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, a_ptr, dtb_ptr, d_ptr, z_ptr, idx_ptr, s_ptr, o_ptr,
                 q_sb, q_sh, q_sk, k_sb, k_sh, k_sk, v_sb, v_sh, v_sv,
                 g_sb, g_sh, g_sk, beta_sb, beta_sh, d_sh, d_sv, z_sb, z_sh, z_sv,
                 idx_s, s_ss, s_sh, s_sk, s_sv, o_sb, o_sh, o_sv,
                 K, V, SLOTS, GROUP, scale, dt_lo, dt_hi,
                 DECAY: tl.constexpr, DELTA: tl.constexpr, L2NORM: tl.constexpr, SSD: tl.constexpr,
                 SOFTPLUS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hk = h // GROUP                                   # the q/k (B/C) head of value head h
    row = tl.load(idx_ptr + b * idx_s).to(tl.int64)
    ok = (row >= 0) & (row < SLOTS)
    row = tl.where(ok, row, 0)
    kk = tl.arange(0, BLOCK_K)
    vv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    km, vm = kk < K, vv < V

    q = tl.load(q_ptr + b * q_sb + hk * q_sh + kk * q_sk, mask=km, other=0.0).to(tl.float32)   # [BK]
    k = tl.load(k_ptr + b * k_sb + hk * k_sh + kk * k_sk, mask=km, other=0.0).to(tl.float32)   # [BK]
    if L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6)
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    q = q * scale
    v = tl.load(v_ptr + b * v_sb + h * v_sh + vv * v_sv, mask=vm, other=0.0).to(tl.float32)    # [BV]

    # the state tile [BK, BV]; a skipped row reads as zero (no rows) and is not stored
    sm = (kk[:, None] < tl.where(ok, K, 0)) & vm[None, :]
    s_at = s_ptr + row * s_ss + h * s_sh + kk[:, None] * s_sk + vv[None, :] * s_sv
    s = tl.load(s_at, mask=sm, other=0.0).to(tl.float32)
    if DECAY == 1:
        g = tl.load(g_ptr + b * g_sb + h * g_sh).to(tl.float32)
        if SSD:  # g is dt: d = clamp(f(dt + dt_bias)), k = d B, log-decay d A
            if HAS_DT_BIAS:
                g += tl.load(dtb_ptr + h).to(tl.float32)
            if SOFTPLUS:
                g = softplus(g)
            g = clamp(g, dt_lo, dt_hi)
            k = k * g
            g = g * tl.load(a_ptr + h).to(tl.float32)
        s = s * tl.exp(g)
    elif DECAY == 2:
        g = tl.load(g_ptr + b * g_sb + h * g_sh + kk * g_sk, mask=km, other=0.0).to(tl.float32)   # [BK]
        s = s * tl.exp(g)[:, None]
    u = v
    if DELTA:  # u = beta (v - S'^T k)
        beta = tl.load(beta_ptr + b * beta_sb + h * beta_sh).to(tl.float32)
        u = beta * (v - tl.sum(s * k[:, None], 0))
    s = s + k[:, None] * u[None, :]
    tl.store(s_at, s.to(s_ptr.dtype.element_ty), mask=sm)

    o = tl.sum(s * q[:, None], 0)                                                              # [BV]
    if HAS_D:
        o += tl.load(d_ptr + h * d_sh + vv * d_sv, mask=vm, other=0.0).to(tl.float32) * v
    if HAS_Z:
        o *= silu(tl.load(z_ptr + b * z_sb + h * z_sh + vv * z_sv, mask=vm, other=0.0).to(tl.float32))
    tl.store(o_ptr + b * o_sb + h * o_sh + vv * o_sv, o.to(o_ptr.dtype.element_ty), mask=vm)


def _step(q, k, v, o, state, idx, *, scale, g=None, beta=None, l2norm=False, swap=False, A=None, dt_bias=None,
          D=None, z=None, dt_softplus=False, dt_limit=(0.0, 0.0)):
    """Launch the step kernel: q, k [bsz, Hk, K], v, o [bsz, Hv, V], the state cache [slots, Hv, K, V] (swap:
    [slots, Hv, V, K], read through swapped strides); A given: ssd, g is dt."""
    bsz, hv, vd = v.shape
    kd = q.shape[2]
    if o.numel() == 0:
        return o
    e = recurrent(q)
    block_k = triton.next_power_of_2(kd)
    block_v = max(1, min(e.block_v, triton.next_power_of_2(vd), TILE // block_k))
    A, dt_bias = dense(A, dt_bias)  # read by bare offsets
    if A is not None:
        decay = HEAD_DECAY
    else:
        decay = NO_DECAY if g is None else (HEAD_DECAY if g.dim() == 2 else KEY_DECAY)
    sk, sv = (3, 2) if swap else (2, 3)
    _step_kernel[(bsz, hv, triton.cdiv(vd, block_v))](
        q_ptr=q, k_ptr=k, v_ptr=v, g_ptr=g, beta_ptr=beta, a_ptr=A, dtb_ptr=dt_bias, d_ptr=D, z_ptr=z, idx_ptr=idx,
        s_ptr=state, o_ptr=o,
        q_sb=q.stride(0), q_sh=q.stride(1), q_sk=q.stride(2), k_sb=k.stride(0), k_sh=k.stride(1), k_sk=k.stride(2),
        v_sb=v.stride(0), v_sh=v.stride(1), v_sv=v.stride(2), g_sb=stride(g, 0), g_sh=stride(g, 1),
        g_sk=stride(g, 2), beta_sb=stride(beta, 0), beta_sh=stride(beta, 1), d_sh=stride(D, 0),
        d_sv=stride(D, 1), z_sb=stride(z, 0), z_sh=stride(z, 1), z_sv=stride(z, 2), idx_s=idx.stride(0),
        s_ss=state.stride(0), s_sh=state.stride(1), s_sk=state.stride(sk), s_sv=state.stride(sv),
        o_sb=o.stride(0), o_sh=o.stride(1), o_sv=o.stride(2),
        K=kd, V=vd, SLOTS=state.shape[0], GROUP=hv // q.shape[1], scale=scale, dt_lo=dt_limit[0],
        dt_hi=dt_limit[1], DECAY=decay, DELTA=beta is not None, L2NORM=l2norm, SSD=A is not None,
        SOFTPLUS=dt_softplus, HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_K=block_k, BLOCK_V=block_v, num_warps=e.num_warps, num_stages=1, **dict(e.options))
    return o


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None, out=None):
    o = out if out is not None else q.new_empty(v.shape)
    return _step(q, k, v, o, state, state_indices, scale=scale, g=g)


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False,
                          out=None):
    o = out if out is not None else v.new_empty(v.shape)
    return _step(q, k, v, o, state, state_indices, scale=scale, g=g, beta=beta, l2norm=use_qk_l2norm)


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), state_indices=None, out=None):
    o = out if out is not None else x.new_empty(x.shape)
    # state [slots, H, P, N] read as [slots, H, N, P]: key dims N, value dims P
    return _step(C, B, x, o, state, state_indices, scale=1.0, g=dt, swap=True, A=A, dt_bias=dt_bias, D=D, z=z,
                 dt_softplus=dt_softplus, dt_limit=dt_limit)
