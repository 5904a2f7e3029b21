"""The chunked kernels that linear_attention (GLA), gated_delta_rule (KDA) and ssd share, and their launchers
(the delta rule's own WY kernel is in delta.py).

A sequence is cut into chunks of C tokens (never straddling sequences). Per chunk, with G the inclusive
cumulative log-decay from the chunk start (per head [C], or per key dim [C, K]) and S_0 the state entering it:
    o = scale * ((q exp(G)) S_0 + A v),   A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i
    S_C = exp(G_last) S_0 + (k exp(G_last - G))^T v
- `_chunk_state`: one program per (sequence, head, key block, value block) walks the sequence's chunks in
  order, storing the state entering each chunk into `hbuf` [chunks, H, K, V] (activation dtype) and the
  final state into the cache row or a new tensor. Delta rule (DELTA): v is v_new = u - w S_0, stored for
  the output kernel; the whole key dim is one tile (w S_0 contracts it).
- `_chunk_output`: one program per (chunk, head, value block) computes o, parallel over chunks.
SSD is linear attention with q = C, k = B, v = d x and log-decay d A (d the processed dt, computed in float32
in each kernel); its state [P, N] is the [N, P] state read and written through swapped strides.

Packed sequences: global chunk c of a packing runs over a grid of T // C + S chunks that covers any packing;
`table` maps chunks to sequences on the device (no host sync); chunks past the real count do nothing.
Decays only enter as exp of differences <= 0 (log-decays are <= 0): per-key-dim decays use sub-chunks of
SUB tokens with the reference point between them (`_key_scores`), so strong decays underflow, never overflow.
Every load and store is masked and state rows are range-checked, so unchecked bad indices touch nothing
outside a tensor. All state math and accumulation is float32; dots take activation-dtype operands.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .common import clamp, dot, silu, softplus
from .tuning import recurrent

SUB = 16  # sub-chunk of the per-key-dim decay scores


# ---- jit helpers ----------------------------------------------------------------------------------

@triton.jit
def _seq(CU, s, T, VARLEN: tl.constexpr):
    """First token and length of sequence s, clamped into [0, T] (unchecked cu_seqlens stay inside)."""
    if VARLEN:
        bos = tl.minimum(tl.maximum(tl.load(CU + s), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(CU + s + 1), bos), T)
        n = eos - bos
    else:
        bos = 0
        n = T
    return bos, n


@triton.jit
def _chunk(CU, OFFS, SEQ, c, T, NSEQ, VARLEN: tl.constexpr, C: tl.constexpr):
    """First token and token count of global chunk c (a count <= 0: no such chunk), and its rows: offsets
    t [C], valid rows tm [C] and token indices tok [C] (int64)."""
    if VARLEN:
        s = tl.load(SEQ + c)
        ok = (s >= 0) & (s < NSEQ)
        s = tl.minimum(tl.maximum(s, 0), NSEQ - 1)
        bos, n = _seq(CU, s, T, True)
        first = (c - tl.load(OFFS + s)) * C
        start = bos + first
        n_c = tl.where(ok, tl.minimum(n - first, C), 0)
    else:
        start = c * C
        n_c = tl.minimum(T - start, C)
    t = tl.arange(0, C)
    return start, n_c, t, t < n_c, (start + t).to(tl.int64)


@triton.jit
def _dt(DT, DTB, tok, tm, h, sd_t, sd_h, sdb, lo, hi, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """SSD's d = clamp(f(dt + dt_bias), lo, hi) in float32 for the tokens `tok` [C]; 0 outside the chunk."""
    d = tl.load(DT + tok * sd_t + h * sd_h, mask=tm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        d += tl.load(DTB + h * sdb).to(tl.float32)
    if SOFTPLUS:
        d = softplus(d)
    d = clamp(d, lo, hi)
    return tl.where(tm, d, 0.0)


@triton.jit
def _key_scores(a, b, G, bp, gp, sb_t, sg_t, start, n_c, km,
                STRICT: tl.constexpr, C: tl.constexpr, SUB_: tl.constexpr):
    """One key block of sum_k a_ik b_jk exp(G_ik - G_jk) for j <= i (j < i if STRICT): [C, C] float32.

    a [C, BK] float32, b [C, BK], G [C, BK] cumulative from the chunk start. Pairs in earlier sub-chunks:
    one product per sub-chunk with the reference r = G before it (both factors <= 1). Pairs inside a
    sub-chunk: elementwise, one column offset at a time, reading row j of b and g (bp, gp: [1, BK]
    pointers of the head and key block) again from memory."""
    t = tl.arange(0, C)
    s = tl.zeros([C, C], dtype=tl.float32)
    base = tl.zeros_like(G)                                                        # G before the row's sub-chunk
    for sb in tl.static_range(1, C // SUB_):
        ref = tl.sum(tl.where(t[:, None] == sb * SUB_ - 1, G, 0.0), 0)            # [BK]
        inside = (t >= sb * SUB_) & (t < sb * SUB_ + SUB_)
        base = tl.where(inside[:, None], ref[None, :], base)
        aa = a * tl.exp(tl.where(inside[:, None], G - ref[None, :], float("-inf")))
        bb = b.to(tl.float32) * tl.exp(tl.where((t < sb * SUB_)[:, None], ref[None, :] - G, float("-inf")))
        s += dot(aa.to(b.dtype), tl.trans(bb.to(b.dtype)))
    dg = G - base                                                                   # g summed over [first, i]
    first = (t // SUB_) * SUB_
    for jj in range(SUB_):
        j = first + jj                                                              # [C]: column of row i
        jm = (j < n_c)[:, None] & km[None, :]
        tok_j = (start + j).to(tl.int64)[:, None]
        dg -= tl.load(gp + tok_j * sg_t, mask=jm, other=0.0).to(tl.float32)         # G_i - G_j
        bj = tl.load(bp + tok_j * sb_t, mask=jm, other=0.0).to(tl.float32)
        if STRICT:
            keep = (t % SUB_) > jj
        else:
            keep = (t % SUB_) >= jj
        # the diagonal exactly exp(0): dg's residual there is of the order of ulp(G), large for strong decays
        e = tl.where(keep[:, None], tl.where((t % SUB_ == jj)[:, None], 0.0, dg), float("-inf"))
        val = tl.sum(a * bj * tl.exp(e), 1)
        s += tl.where(t[None, :] == j[:, None], val[:, None], 0.0)
    return s


@triton.jit
def _dot_full(a, b):
    """a @ b where one operand is float32 and the other 16-bit (the activations'): the float32 one enters
    the dot as two 16-bit halves (hi + lo), so it keeps float32 accuracy on the matrix units."""
    if a.dtype == b.dtype:
        return dot(a, b)
    elif a.dtype == tl.float32:
        hi = a.to(b.dtype)
        return dot(hi, b) + dot((a - hi.to(tl.float32)).to(b.dtype), b)
    else:
        hi = b.to(a.dtype)
        return dot(a, hi) + dot(a, (b - hi.to(tl.float32)).to(a.dtype))


# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def _chunk_state(
    K_, V_, G_, DT, DTB, A_, W_, U_, VNEW, H0, IDX, HAS, HBUF, HT, CU, OFFS,
    sk_t, sk_h, sk_k, sv_t, sv_h, sv_v, sg_t, sg_h, sg_k, sd_t, sd_h, sdb, sa,
    sw_t, sw_h, sw_k, su_t, su_h, su_v,
    s0_s, s0_h, s0_k, s0_v, sf_s, sf_h, sf_k, sf_v, s_hc, s_hh, s_hk,
    T, K, V, NC, NSLOTS, lo, hi,
    GROUP: tl.constexpr, GATE: tl.constexpr, SSD: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr, INIT: tl.constexpr,
    HAS_FLAG: tl.constexpr, FINAL: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """GATE: 0 none, 1 per head, 2 per key dim. INIT: 0 zero, 1 initial_state[s], 2 cache row IDX[s].
    FINAL: 0 none, 1 new tensor HT[s], 2 cache row IDX[s]."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    nv = tl.cdiv(V, BV)
    kk = (tl.program_id(2) // nv) * BK + tl.arange(0, BK)
    vv = (tl.program_id(2) % nv) * BV + tl.arange(0, BV)
    km = kk < K
    vm = vv < V
    sm = km[:, None] & vm[None, :]
    hk = h // GROUP
    bos, n = _seq(CU, s, T, VARLEN)

    if INIT == 2 or FINAL == 2:
        row = tl.load(IDX + s + kk * 0)                                   # [BK]: the row, broadcast
        row_ok = (row >= 0) & (row < NSLOTS)
        row = tl.where(row_ok, row, 0).to(tl.int64)
    state = tl.zeros([BK, BV], dtype=tl.float32)                          # [K block, V block]
    if INIT == 1:
        state = tl.load(H0 + s.to(tl.int64) * s0_s + h * s0_h + kk[:, None] * s0_k + vv[None, :] * s0_v,
                        mask=sm, other=0.0).to(tl.float32)
    elif INIT == 2:
        read = row_ok
        if HAS_FLAG:
            read = read & (tl.load(HAS + s + kk * 0) != 0)
        state = tl.load(H0 + row[:, None] * s0_s + h * s0_h + kk[:, None] * s0_k + vv[None, :] * s0_v,
                        mask=sm & read[:, None], other=0.0).to(tl.float32)

    t = tl.arange(0, C)
    if VARLEN:
        c0 = tl.load(OFFS + s)
    else:
        c0 = 0
    for i in range(tl.cdiv(n, C)):
        c = c0 + i
        tm = t < n - i * C
        tok = (bos + i * C + t).to(tl.int64)
        cm = (kk * 0 + c) < NC
        tl.store(HBUF + c.to(tl.int64) * s_hc + h * s_hh + kk[:, None] * s_hk + vv[None, :],
                 state.to(HBUF.dtype.element_ty), mask=sm & cm[:, None])
        kt = tl.load(K_ + tok[None, :] * sk_t + hk * sk_h + kk[:, None] * sk_k,
                     mask=km[:, None] & tm[None, :], other=0.0)                         # [BK, C]
        vtm = tm[:, None] & vm[None, :]
        if DELTA:  # v_new = u - w S_0
            w = tl.load(W_ + tok[:, None] * sw_t + h * sw_h + kk[None, :] * sw_k,
                        mask=tm[:, None] & km[None, :], other=0.0)                      # [C, BK]
            u = tl.load(U_ + tok[:, None] * su_t + h * su_h + vv[None, :] * su_v, mask=vtm, other=0.0)
            v = (u.to(tl.float32) - dot(w, state.to(w.dtype))).to(VNEW.dtype.element_ty)
            tl.store(VNEW + tok[:, None] * su_t + h * su_h + vv[None, :] * su_v, v, mask=vtm)
            v = v.to(tl.float32)
        else:
            v = tl.load(V_ + tok[:, None] * sv_t + h * sv_h + vv[None, :] * sv_v, mask=vtm, other=0.0)
            v = v.to(tl.float32)
        if SSD:
            d = _dt(DT, DTB, tok, tm, h, sd_t, sd_h, sdb, lo, hi, SOFTPLUS, HAS_BIAS)
            v = v * d[:, None]
            g = d * tl.load(A_ + h * sa).to(tl.float32)
        elif GATE == 1:
            g = tl.load(G_ + tok * sg_t + h * sg_h, mask=tm, other=0.0).to(tl.float32)
        # the last row of the cumulative sum itself (not a separate sum: the diagonal factor must be 1)
        if GATE == 1:
            gc = tl.cumsum(g, 0)
            last = tl.sum(tl.where(t == C - 1, gc, 0.0), 0)
            v = v * tl.exp(last - gc)[:, None]
            state = state * tl.exp(last)
        elif GATE == 2:
            gt = tl.load(G_ + tok[None, :] * sg_t + h * sg_h + kk[:, None] * sg_k,
                         mask=km[:, None] & tm[None, :], other=0.0).to(tl.float32)     # [BK, C]
            gc = tl.cumsum(gt, 1)
            last = tl.sum(tl.where(t[None, :] == C - 1, gc, 0.0), 1)
            kt = kt.to(tl.float32) * tl.exp(last[:, None] - gc)
            state = state * tl.exp(last)[:, None]
        # the decayed operand (float32) at full accuracy: a 16-bit rounding of it is the final state's error;
        # but the delta rule's v_new is 16-bit already, and one more rounding of it (as fla does) keeps one
        # dot on the walk's critical path instead of two
        if DELTA and GATE == 1:
            state += dot(kt, v.to(K_.dtype.element_ty))
        elif GATE == 2:
            state += _dot_full(kt, v.to(K_.dtype.element_ty))
        elif GATE == 1:
            state += _dot_full(kt, v)
        else:
            state += dot(kt, v.to(K_.dtype.element_ty))

    if FINAL == 1:
        tl.store(HT + s.to(tl.int64) * sf_s + h * sf_h + kk[:, None] * sf_k + vv[None, :] * sf_v,
                 state.to(HT.dtype.element_ty), mask=sm)
    elif FINAL == 2:
        tl.store(HT + row[:, None] * sf_s + h * sf_h + kk[:, None] * sf_k + vv[None, :] * sf_v,
                 state.to(HT.dtype.element_ty), mask=sm & row_ok[:, None])


@triton.jit
def _chunk_output(
    Q_, K_, V_, G_, DT, DTB, A_, D_, Z_, O_, HBUF, CU, OFFS, SEQ,
    sq_t, sq_h, sq_k, sk_t, sk_h, sk_k, sv_t, sv_h, sv_v, sg_t, sg_h, sg_k, sd_t, sd_h, sdb, sa,
    sD_h, sD_v, sz_t, sz_h, sz_v, so_t, so_h, so_v, s_hc, s_hh, s_hk,
    T, K, V, NSEQ, scale, lo, hi,
    GROUP: tl.constexpr, GATE: tl.constexpr, SSD: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, VARLEN: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SUB_: tl.constexpr,
):
    c = tl.program_id(0)
    h = tl.program_id(1)
    vv = tl.program_id(2) * BV + tl.arange(0, BV)
    vm = vv < V
    hk = h // GROUP
    start, n_c, t, tm, tok = _chunk(CU, OFFS, SEQ, c, T, NSEQ, VARLEN, C)
    if n_c > 0:
        causal = t[None, :] <= t[:, None]
        acc = tl.zeros([C, BV], dtype=tl.float32)                             # (q exp(G)) S_0
        sc = tl.zeros([C, C], dtype=tl.float32)                               # A
        if SSD:
            d = _dt(DT, DTB, tok, tm, h, sd_t, sd_h, sdb, lo, hi, SOFTPLUS, HAS_BIAS)
            g = d * tl.load(A_ + h * sa).to(tl.float32)
        elif GATE == 1:
            g = tl.load(G_ + tok * sg_t + h * sg_h, mask=tm, other=0.0).to(tl.float32)
        hb = HBUF + c.to(tl.int64) * s_hc + h * s_hh
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            tkm = tm[:, None] & km[None, :]
            q = tl.load(Q_ + tok[:, None] * sq_t + hk * sq_h + kk[None, :] * sq_k, mask=tkm, other=0.0)
            k = tl.load(K_ + tok[:, None] * sk_t + hk * sk_h + kk[None, :] * sk_k, mask=tkm, other=0.0)
            hs = tl.load(hb + kk[:, None] * s_hk + vv[None, :], mask=km[:, None] & vm[None, :], other=0.0)
            if GATE == 2:
                gk = tl.cumsum(tl.load(G_ + tok[:, None] * sg_t + h * sg_h + kk[None, :] * sg_k, mask=tkm,
                                       other=0.0).to(tl.float32), 0)
                qf = q.to(tl.float32)
                acc += dot((qf * tl.exp(gk)).to(hs.dtype), hs)
                sc += _key_scores(qf, k, gk, K_ + hk * sk_h + kk[None, :] * sk_k, G_ + h * sg_h + kk[None, :] * sg_k,
                                  sk_t, sg_t, start, n_c, km, False, C, SUB_)
            else:
                acc += dot(q, hs)
                sc += dot(q, tl.trans(k))
        if GATE == 1:
            gc = tl.cumsum(g, 0)
            acc *= tl.exp(gc)[:, None]
            sc *= tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
        elif GATE == 0:
            sc = tl.where(causal, sc, 0.0)
        if SSD:  # v = d x: d joins the score columns (x enters the dot unrounded)
            sc *= d[None, :]
        vtm = tm[:, None] & vm[None, :]
        x = tl.load(V_ + tok[:, None] * sv_t + h * sv_h + vv[None, :] * sv_v, mask=vtm, other=0.0)
        o = (acc + _dot_full(sc, x)) * scale  # the scores at float32 accuracy: one rounding per score is too coarse
        if HAS_D:
            o += tl.load(D_ + h * sD_h + vv * sD_v, mask=vm, other=0.0).to(tl.float32)[None, :] * x.to(tl.float32)
        if HAS_Z:
            z = tl.load(Z_ + tok[:, None] * sz_t + h * sz_h + vv[None, :] * sz_v, mask=vtm, other=0.0).to(tl.float32)
            o *= silu(z)
        tl.store(O_ + tok[:, None] * so_t + h * so_h + vv[None, :] * so_v, o.to(O_.dtype.element_ty), mask=vtm)


# ---- launchers ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Chunking of one call: the launch entry, the chunk count of the grid and the device tables."""
    entry: object
    chunk: int
    n_chunks: int            # grid of chunks: T // C + S (packed) or cdiv(T, C)
    nseq: int
    cu: torch.Tensor | None
    offs: torch.Tensor | None   # [S + 1] first global chunk of each sequence
    seq: torch.Tensor | None    # [n_chunks] sequence of each chunk (S: none)

    @property
    def varlen(self) -> bool:
        return self.cu is not None

    def tables(self, fallback: torch.Tensor) -> tuple:
        return (self.cu, self.offs, self.seq) if self.varlen else (fallback,) * 3

    def launch(self) -> dict:
        return {"num_warps": self.entry.num_warps, "num_stages": self.entry.num_stages, **dict(self.entry.options)}


def plan(x: torch.Tensor, cu_seqlens) -> Plan:
    """The chunks of tokens x [T, ...] packed by cu_seqlens, tables built on the device."""
    e = recurrent(x)
    c, n_tok = e.chunk, x.shape[0]
    if cu_seqlens is None:
        return Plan(e, c, triton.cdiv(n_tok, c), 1, None, None, None)
    nseq = cu_seqlens.shape[0] - 1
    ends = cu_seqlens.clamp(0, n_tok)
    lens = (ends[1:] - ends[:-1]).clamp(min=0)
    offs = torch.zeros(nseq + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(torch.div(lens + (c - 1), c, rounding_mode="floor"), 0, out=offs[1:])
    n_chunks = n_tok // c + nseq
    seq = torch.searchsorted(offs[1:], torch.arange(n_chunks, dtype=torch.int32, device=x.device), right=True,
                             out_int32=True)
    return Plan(e, c, n_chunks, nseq, cu_seqlens, offs, seq)


@dataclasses.dataclass
class States:
    """Where initial states come from and final states go (SPEC "States"); swap: the state is [V, K]."""
    init: torch.Tensor | None
    idx: torch.Tensor | None
    has: torch.Tensor | None
    final: torch.Tensor | None   # what the op returns as final_state
    swap: bool = False

    def args(self, fallback: torch.Tensor) -> dict:
        mode_in = 2 if self.idx is not None else (1 if self.init is not None else 0)
        ht = self.init if self.idx is not None else self.final
        mode_out = 2 if self.idx is not None else (1 if self.final is not None else 0)
        return dict(H0=self.init if self.init is not None else fallback,
                    IDX=self.idx if self.idx is not None else fallback,
                    HAS=self.has if self.has is not None else fallback,
                    HT=ht if ht is not None else fallback,
                    strides=self._strides(self.init) + self._strides(ht),
                    NSLOTS=self.init.shape[0] if self.idx is not None else 0,
                    INIT=mode_in, HAS_FLAG=self.has is not None, FINAL=mode_out)

    def _strides(self, x) -> tuple:
        if x is None:
            return (0, 0, 0, 0)
        s = x.stride()
        return (s[0], s[1], s[3], s[2]) if self.swap else s


def states(initial_state, state_indices, has_initial_state, output_final_state, nseq: int, tail: tuple, device,
           swap: bool = False) -> States:
    """The state plumbing of a call; a new final_state [S, *tail] is allocated when one is returned."""
    if state_indices is not None:
        return States(initial_state, state_indices, has_initial_state,
                      initial_state if output_final_state else None, swap)
    final = None
    if output_final_state:
        dtype = initial_state.dtype if initial_state is not None else torch.float32
        final = torch.empty((nseq,) + tuple(tail), dtype=dtype, device=device)
    return States(initial_state, None, None, final, swap)


def _strides3(x: torch.Tensor | None) -> tuple:
    """Strides of a [T, H, F] (or [T, H]: F stride 0) tensor; zeros for None."""
    if x is None:
        return (0, 0, 0)
    s = x.stride()
    return (s[0], s[1], s[2] if x.dim() == 3 else 0)


@dataclasses.dataclass
class Ssd:
    """SSD's extras: dt processing, D skip and z gate."""
    dt: torch.Tensor
    A: torch.Tensor
    dt_bias: torch.Tensor | None
    softplus: bool
    limit: tuple
    D: torch.Tensor | None
    z: torch.Tensor | None


def _gate(g, ssd) -> int:
    """The GATE constexpr: 0 no decay, 1 per head (SSD: d A), 2 per key dim."""
    if ssd is not None:
        return 1
    return 0 if g is None else (2 if g.dim() == 3 else 1)


def state_pass(p: Plan, k, v, g, st: States, n_heads: int, kdim: int, vdim: int, *, ssd: Ssd | None = None,
               wu=None) -> tuple:
    """Run `_chunk_state`: returns (hbuf [chunks, H, K, V] activation dtype, v_new or None).
    wu = (w, u) switches on the delta rule (whole key dim per program; v_new in the activation dtype, laid out as u)."""
    e = p.entry
    delta = wu is not None
    bk = max(triton.next_power_of_2(kdim), e.min_dot) if delta else e.block_k
    # a whole-key state tile holds at most twice a [block_k, block_v] tile (registers)
    bv = max(e.min_dot, min(e.block_v, 2 * e.block_k * e.block_v // bk)) if delta else e.block_v
    hbuf = torch.empty((p.n_chunks, n_heads, kdim, vdim), dtype=k.dtype, device=k.device)
    w, u = wu if delta else (k, v)
    vnew = torch.empty(u.shape, dtype=k.dtype, device=k.device) if delta else None
    if p.nseq == 0:
        return hbuf, vnew
    sa = st.args(k)
    cu, offs, _ = p.tables(k)
    x = ssd or Ssd(k, k, None, False, (0.0, 0.0), None, None)
    grid = (p.nseq, n_heads, triton.cdiv(kdim, bk) * triton.cdiv(vdim, bv))
    _chunk_state[grid](
        k, v, g if g is not None else k, x.dt, x.dt_bias if x.dt_bias is not None else k, x.A,
        w, u, vnew if delta else u, sa["H0"], sa["IDX"], sa["HAS"], hbuf, sa["HT"], cu, offs,
        *_strides3(k), *_strides3(v), *_strides3(g), *_strides3(x.dt)[:2],
        x.dt_bias.stride(0) if x.dt_bias is not None else 0, x.A.stride(0),
        *_strides3(w), *_strides3(u), *sa["strides"], hbuf.stride(0), hbuf.stride(1), hbuf.stride(2),
        k.shape[0], kdim, vdim, p.n_chunks, sa["NSLOTS"], float(x.limit[0]), float(x.limit[1]),
        GROUP=n_heads // k.shape[1], GATE=_gate(g, ssd), SSD=ssd is not None, SOFTPLUS=x.softplus,
        HAS_BIAS=x.dt_bias is not None, DELTA=delta,
        VARLEN=p.varlen, INIT=sa["INIT"], HAS_FLAG=sa["HAS_FLAG"], FINAL=sa["FINAL"],
        C=p.chunk, BK=bk, BV=bv, **p.launch())
    return hbuf, vnew


def output_pass(p: Plan, q, k, v, g, hbuf, o, scale: float, *, ssd: Ssd | None = None) -> None:
    """Run `_chunk_output` into o [T, H, V] (any strides)."""
    if p.n_chunks == 0:
        return
    e = p.entry
    n_heads, kdim, vdim = hbuf.shape[1:]
    x = ssd or Ssd(k, k, None, False, (0.0, 0.0), None, None)
    D = x.D
    sD = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    cu, offs, seq = p.tables(k)
    grid = (p.n_chunks, n_heads, triton.cdiv(vdim, e.block_v))
    _chunk_output[grid](
        q, k, v, g if g is not None else k, x.dt, x.dt_bias if x.dt_bias is not None else k, x.A,
        D if D is not None else k, x.z if x.z is not None else k, o, hbuf, cu, offs, seq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(g), *_strides3(x.dt)[:2],
        x.dt_bias.stride(0) if x.dt_bias is not None else 0, x.A.stride(0), *sD, *_strides3(x.z), *_strides3(o),
        hbuf.stride(0), hbuf.stride(1), hbuf.stride(2),
        q.shape[0], kdim, vdim, p.nseq, float(scale), float(x.limit[0]), float(x.limit[1]),
        GROUP=n_heads // k.shape[1], GATE=_gate(g, ssd), SSD=ssd is not None, SOFTPLUS=x.softplus,
        HAS_BIAS=x.dt_bias is not None, HAS_D=D is not None, HAS_Z=x.z is not None, VARLEN=p.varlen,
        C=p.chunk, BK=e.block_k, BV=e.block_v, SUB_=SUB, **p.launch())
