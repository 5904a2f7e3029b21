"""merge_attention_states: one program per (token, tile of heads) reads the two lse, weighs each part by
exp(lse_part - lse) in float32 and writes the merged row tile by tile of the value dim. A part whose lse is
-inf is never loaded (its row may hold anything); the sinks join the denominator once."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # elements of one program's [heads, value dim] tile
NEG_INF = tl.constexpr(float("-inf"))  # a global a jit function reads must be a constexpr


@triton.jit
def _merge_kernel(oa_ptr, ob_ptr, la_ptr, lb_ptr, sink_ptr, out_ptr, lse_ptr,
                  H, DV, oa_st, oa_sh, oa_sd, ob_st, ob_sh, ob_sd, la_sh, la_st, lb_sh, lb_st, sink_s,
                  out_st, out_sh, out_sd, lse_sh,
                  HAS_SINKS: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    la = tl.load(la_ptr + h * la_sh + t * la_st, mask=hm, other=NEG_INF).to(tl.float32)   # [BLOCK_H]
    lb = tl.load(lb_ptr + h * lb_sh + t * lb_st, mask=hm, other=NEG_INF).to(tl.float32)
    m = tl.maximum(la, lb)
    if HAS_SINKS:
        ls = tl.load(sink_ptr + h * sink_s, mask=hm, other=NEG_INF).to(tl.float32)
        m = tl.maximum(m, ls)
    empty = m == NEG_INF                      # nothing seen and no sink: o = 0, lse = -inf
    m = tl.where(empty, 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    z = wa + wb
    if HAS_SINKS:
        z += tl.exp(ls - m)
    z = tl.where(empty, 1.0, z)
    ca = (wa / z)[:, None]
    cb = (wb / z)[:, None]
    ra = (hm & (la > NEG_INF))[:, None]       # an empty part's row is not read
    rb = (hm & (lb > NEG_INF))[:, None]
    for d0 in range(0, DV, BLOCK_DV):
        d = (d0 + tl.arange(0, BLOCK_DV))[None, :]
        dm = d < DV
        xa = tl.load(oa_ptr + t * oa_st + h[:, None] * oa_sh + d * oa_sd, mask=ra & dm, other=0.0).to(tl.float32)
        xb = tl.load(ob_ptr + t * ob_st + h[:, None] * ob_sh + d * ob_sd, mask=rb & dm, other=0.0).to(tl.float32)
        o = ca * xa + cb * xb
        tl.store(out_ptr + t * out_st + h[:, None] * out_sh + d * out_sd, o.to(out_ptr.dtype.element_ty),
                 mask=hm[:, None] & dm)
    if WRITE_LSE:
        tl.store(lse_ptr + h * lse_sh + t, tl.where(empty, NEG_INF, m + tl.log(z)), mask=hm)


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks=None, return_lse=False, out=None):
    t, h, dv = o_a.shape
    o = out if out is not None else o_a.new_empty(o_a.shape)
    lse = torch.empty(h, t, dtype=torch.float32, device=o_a.device) if return_lse else None
    if t:
        block_dv = min(triton.next_power_of_2(dv), 256)
        block_h = max(1, min(triton.next_power_of_2(h), TILE // block_dv))
        _merge_kernel[(t, triton.cdiv(h, block_h))](
            oa_ptr=o_a, ob_ptr=o_b, la_ptr=lse_a, lb_ptr=lse_b, sink_ptr=sinks, out_ptr=o, lse_ptr=lse,
            H=h, DV=dv, oa_st=o_a.stride(0), oa_sh=o_a.stride(1), oa_sd=o_a.stride(2),
            ob_st=o_b.stride(0), ob_sh=o_b.stride(1), ob_sd=o_b.stride(2),
            la_sh=lse_a.stride(0), la_st=lse_a.stride(1), lb_sh=lse_b.stride(0), lb_st=lse_b.stride(1),
            sink_s=sinks.stride(0) if sinks is not None else 0,
            out_st=o.stride(0), out_sh=o.stride(1), out_sd=o.stride(2), lse_sh=t,
            HAS_SINKS=sinks is not None, WRITE_LSE=return_lse, BLOCK_H=block_h, BLOCK_DV=block_dv,
            num_warps=1 if block_h * block_dv <= 512 else 4)
    return (o, lse) if return_lse else o
