"""gated_delta_rule (SPEC; Gated DeltaNet with grouped value heads, KDA with per-key-dim g) through the
shared chunk kernels (chunk.py) and its own WY kernel:
- `_delta_wy`: per (chunk, value head) the WY form, A = strictly-lower beta_i (k_i . k_j) exp(G_i - G_j)
  (the decay summed over (j, i] directly, `_segsum`),
  T = (I + A)^-1 (`_unit_lower_inverse`: 4 diagonal blocks by forward substitution, then block rows by
  dots), w = T (beta k exp(G)), u = T (beta v);
- the state pass with v_new = u - w S_0, then the output kernel on v_new (chunk.py).
With use_qk_l2norm, q and k are normalised first (`_l2norm`: float32 math, one kernel each)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunk, states
from .chunk import SUB, Plan, _chunk, _dot_full, _key_scores, _segsum, gate_args
from .common import dot


@triton.jit
def _unit_lower_inverse(a, C: tl.constexpr):
    """(I + a)^-1 for a strictly lower [C, C] float32, in 4 diagonal blocks of C/4 rows. D^-1, the inverse of
    the diagonal blocks: forward substitution, row i of every block at once (row i of T is e_i - a[i, :] T,
    the rows above it in its block final), one dot per step. Then the block rows below the first, in order:
    T_b = D_b^-1 (E_b - N_b T), N the part of a below the diagonal blocks. C/4 - 1 + 6 dots, not C - 1 steps."""
    t = tl.arange(0, C)
    blk = t // (C // 4)
    same = blk[:, None] == blk[None, :]
    dinv = (t[:, None] == t[None, :]).to(tl.float32)
    ad = tl.where(same, a, 0.0)
    for i in range(1, C // 4):
        row = ((t % (C // 4)) == i)[:, None]
        dinv = tl.where(row, dinv - dot(tl.where(row, ad, 0.0), dinv), dinv)
    n = tl.where(same, 0.0, a)
    inv = dinv
    for b in range(1, 4):
        inv -= dot(dinv, tl.where((blk == b)[:, None], dot(n, inv), 0.0))
    return inv


@triton.jit
def _keys(K_, G_, tok, tm, k0, hk, h, sk_t, sk_h, sk_k, sg_t, sg_h, sg_k, K, GATE: tl.constexpr, BK: tl.constexpr):
    """Key block k0 of the chunk's rows `tok` [C]: dims kk [BK], their mask km, the tile mask [C, BK], the keys
    k [C, BK] and (per-key-dim decays, GATE 2) the log-decays gk [C, BK] float32 (else 0)."""
    kk = k0 + tl.arange(0, BK)
    km = kk < K
    tkm = tm[:, None] & km[None, :]
    k = tl.load(K_ + tok[:, None] * sk_t + hk * sk_h + kk[None, :] * sk_k, mask=tkm, other=0.0)
    gk = 0.0
    if GATE == 2:
        gk = tl.load(G_ + tok[:, None] * sg_t + h * sg_h + kk[None, :] * sg_k, mask=tkm, other=0.0).to(tl.float32)
    return kk, km, tkm, k, gk


@triton.jit
def _delta_wy(
    K_, V_, G_, BETA, W_, U_, CU, OFFS, SEQ,
    sk_t, sk_h, sk_k, sv_t, sv_h, sv_v, sg_t, sg_h, sg_k, sb_t, sb_h, sw_t, sw_h, sw_k, su_t, su_h, su_v,
    T, K, V, NSEQ,
    GROUP: tl.constexpr, GATE: tl.constexpr, VARLEN: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SUB_: tl.constexpr,
):
    """w = T (beta k exp(G)) [C, K] and u = T (beta v) [C, V] of one (chunk, value head), T = (I + A)^-1."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    start, n_c, t, tm, tok = _chunk(CU, OFFS, SEQ, c, T, NSEQ, VARLEN, C)
    if n_c > 0:
        beta = tl.load(BETA + tok * sb_t + h * sb_h, mask=tm, other=0.0).to(tl.float32)
        a = tl.zeros([C, C], dtype=tl.float32)
        if GATE == 1:
            gh = tl.load(G_ + tok * sg_t + h * sg_h, mask=tm, other=0.0).to(tl.float32)
        for k0 in range(0, K, BK):
            kk, km, tkm, k, gk = _keys(K_, G_, tok, tm, k0, hk, h, sk_t, sk_h, sk_k, sg_t, sg_h, sg_k, K, GATE, BK)
            if GATE == 2:
                a += _key_scores(k.to(tl.float32), k, gk, K_ + hk * sk_h + kk[None, :] * sk_k,
                                 G_ + h * sg_h + kk[None, :] * sg_k, sk_t, sg_t, start, n_c, km, True, C, SUB_)
            else:
                a += dot(k, tl.trans(k))
        if GATE == 1:
            a *= tl.exp(tl.where(t[None, :] < t[:, None], _segsum(gh, C), float("-inf")))
        a *= beta[:, None]
        inv = _unit_lower_inverse(a, C)
        # beta (per head also exp(G)) joins the columns of T, so that k and v enter the dots unrounded
        tb = inv * beta[None, :]
        if GATE == 1:
            tw = tb * tl.exp(tl.cumsum(gh, 0))[None, :]
        else:
            tw = tb
        for k0 in range(0, K, BK):
            kk, km, tkm, k, gk = _keys(K_, G_, tok, tm, k0, hk, h, sk_t, sk_h, sk_k, sg_t, sg_h, sg_k, K, GATE, BK)
            if GATE == 2:
                k = (k.to(tl.float32) * tl.exp(tl.cumsum(gk, 0))).to(k.dtype)
            w = _dot_full(tw, k)
            tl.store(W_ + tok[:, None] * sw_t + h * sw_h + kk[None, :] * sw_k, w.to(W_.dtype.element_ty), mask=tkm)
        for v0 in range(0, V, BV):
            vv = v0 + tl.arange(0, BV)
            vtm = tm[:, None] & (vv < V)[None, :]
            v = tl.load(V_ + tok[:, None] * sv_t + h * sv_h + vv[None, :] * sv_v, mask=vtm, other=0.0)
            tl.store(U_ + tok[:, None] * su_t + h * su_h + vv[None, :] * su_v, _dot_full(tb, v).to(U_.dtype.element_ty),
                     mask=vtm)


@triton.jit
def _l2norm(X, Y, sx_t, sx_h, sx_k, T, H, K, BT: tl.constexpr, BK: tl.constexpr):
    """y = x rsqrt(sum_K x^2 + 1e-6) in float32, for BT rows of one head; Y contiguous [T, H, K]."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    kk = tl.arange(0, BK)
    m = (t < T)[:, None] & (kk < K)[None, :]
    row = t.to(tl.int64)[:, None]
    x = tl.load(X + row * sx_t + h * sx_h + kk[None, :] * sx_k, mask=m, other=0.0).to(tl.float32)
    y = x / tl.sqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    tl.store(Y + row * (H * K) + h * K + kk[None, :], y.to(Y.dtype.element_ty), mask=m)


def wy_pass(p: Plan, k, v, g, beta) -> tuple:
    """Run `_delta_wy`: w [T, Hv, K] in the activation dtype (a dot operand) and u [T, Hv, V] in float32
    (v_new = u - w S_0 is a difference of near-equal terms: rounding u to 16 bits was most of the error)."""
    n_tok, hv, vdim = v.shape
    kdim = k.shape[2]
    w = torch.empty((n_tok, hv, kdim), dtype=k.dtype, device=k.device)
    u = torch.empty((n_tok, hv, vdim), dtype=torch.float32, device=k.device)
    if p.n_chunks == 0:
        return w, u
    e = p.entry
    _delta_wy[(p.n_chunks, hv)](
        K_=k, V_=v, BETA=beta, W_=w, U_=u,
        sk_t=k.stride(0), sk_h=k.stride(1), sk_k=k.stride(2), sv_t=v.stride(0), sv_h=v.stride(1),
        sv_v=v.stride(2), sb_t=beta.stride(0), sb_h=beta.stride(1), sw_t=w.stride(0), sw_h=w.stride(1),
        sw_k=w.stride(2), su_t=u.stride(0), su_h=u.stride(1), su_v=u.stride(2),
        T=n_tok, K=kdim, V=vdim, **gate_args(g, None), **p.tables(),
        GROUP=hv // k.shape[1], C=p.chunk, BK=e.block_k, BV=e.block_v, SUB_=SUB, **p.launch())
    return w, u


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x rsqrt(sum_K x^2 + 1e-6) per [T, H, K] row, computed in float32, in x's dtype (a new tensor)."""
    n_tok, h, kdim = x.shape
    y = torch.empty((n_tok, h, kdim), dtype=x.dtype, device=x.device)
    if n_tok == 0:
        return y
    bk = triton.next_power_of_2(kdim)
    bt = max(1, min(64, 4096 // bk))
    _l2norm[(triton.cdiv(n_tok, bt), h)](X=x, Y=y, sx_t=x.stride(0), sx_h=x.stride(1), sx_k=x.stride(2), T=n_tok,
                                         H=h, K=kdim, BT=bt, BK=bk, num_warps=4)
    return y


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None):
    _, hv, vd = v.shape
    kd = q.shape[2]
    o = out if out is not None else v.new_empty(v.shape)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    p = chunk.plan(q, cu_seqlens)
    st = states.route(initial_state, state_indices, has_initial_state, output_final_state, p.nseq, (hv, kd, vd),
                      q.device)
    w, u = wy_pass(p, k, v, g, beta)
    hbuf, vnew = chunk.state_pass(p, k, v, g, st, hv, kd, vd, wu=(w, u))
    chunk.output_pass(p, q, k, vnew, g, hbuf, o, scale)
    return o, st.final
