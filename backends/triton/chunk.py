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
Decays only enter as exp of sums of log-decays (<= 0) taken directly over the tokens between two points
(`_segsum`, suffix sums, per-key-dim sub-chunks of SUB tokens in `_key_scores`), never as the difference of
two cumulative sums: strong decays underflow, never overflow or cancel, and g = -inf is a factor 0.
Every load and store is masked and state rows are range-checked, so unchecked bad indices touch nothing
outside a tensor. All state math and accumulation is float32; dots take activation-dtype operands.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .common import clamp, dense, dot, silu, softplus, stride
from .states import States, cache_row, load_initial, store_final
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
def _segsum(g, C: tl.constexpr):
    """[C, C] float32: g [C] summed over (j, i] for j < i (0 on and above the diagonal), as direct sums of
    log-decays: a difference of two cumulative sums would cancel under strong decays (and give
    -inf - -inf = NaN for g = -inf)."""
    t = tl.arange(0, C)
    return tl.cumsum(tl.where(t[:, None] > t[None, :], g[:, None], 0.0), 0)


@triton.jit
def _key_scores(a, b, g, bp, gp, sb_t, sg_t, start, n_c, km,
                STRICT: tl.constexpr, C: tl.constexpr, SUB_: tl.constexpr):
    """One key block of sum_k a_ik b_jk exp(sum of g_k over (j, i]) for j <= i (j < i if STRICT): [C, C] float32.

    a [C, BK] float32, b [C, BK], g [C, BK] the log-decays (float32, 0 outside the chunk). Every exponent is
    a sum of log-decays (all <= 0), never a difference of two sums: strong decays lose no accuracy and
    g = -inf gives a factor 0, never NaN. Pairs in earlier sub-chunks: one product per sub-chunk, a scaled
    by the decay from the sub-chunk's start to row i, b by the decay from row j to that start (both
    factors <= 1). Pairs inside a sub-chunk: elementwise, one column at a time from the last, reading row
    j of b and g (bp, gp: [1, BK] pointers of the head and key block) again from memory."""
    BK: tl.constexpr = g.shape[1]
    NS: tl.constexpr = C // SUB_
    t = tl.arange(0, C)
    s = tl.zeros([C, C], dtype=tl.float32)
    # per sub-chunk scans: g over [its start, i] (rows) and over (j, its end] (g of row j + 1 onwards)
    pre = tl.reshape(tl.cumsum(tl.reshape(g, [NS, SUB_, BK]), 1), [C, BK])
    nm = (((t + 1) % SUB_ != 0) & (t + 1 < n_c))[:, None] & km[None, :]
    nxt = tl.load(gp + (start + t + 1).to(tl.int64)[:, None] * sg_t, mask=nm, other=0.0).to(tl.float32)
    run = tl.reshape(tl.cumsum(tl.reshape(nxt, [NS, SUB_, BK]), 1, reverse=True), [C, BK])
    for sb in tl.static_range(1, NS):
        inside = (t >= sb * SUB_) & (t < sb * SUB_ + SUB_)
        before = t < sb * SUB_
        aa = a * tl.exp(tl.where(inside[:, None], pre, float("-inf")))
        bb = b.to(tl.float32) * tl.exp(tl.where(before[:, None], run, float("-inf")))   # run: g over (j, sb's start)
        s += dot(aa.to(b.dtype), tl.trans(bb.to(b.dtype)))
        run = tl.where(before[:, None], run + tl.sum(tl.where(inside[:, None], g, 0.0), 0)[None, :], run)
    dg = tl.zeros_like(g)                                                           # g over (j, i]
    g_up = tl.zeros_like(g)                                                         # g of row j + 1
    first = (t // SUB_) * SUB_
    for r in range(SUB_):
        jj = SUB_ - 1 - r
        j = first + jj                                                              # [C]: column of row i
        dg += tl.where(((t % SUB_) > jj)[:, None], g_up, 0.0)
        jm = (j < n_c)[:, None] & km[None, :]
        tok_j = (start + j).to(tl.int64)[:, None]
        g_up = tl.load(gp + tok_j * sg_t, mask=jm, other=0.0).to(tl.float32)
        bj = tl.load(bp + tok_j * sb_t, mask=jm, other=0.0).to(tl.float32)
        if STRICT:
            keep = (t % SUB_) > jj
        else:
            keep = (t % SUB_) >= jj
        val = tl.sum(a * bj * tl.exp(tl.where(keep[:, None], dg, float("-inf"))), 1)   # the diagonal: exp(0)
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

    row, row_ok = cache_row(IDX, s, kk, NSLOTS, INIT == 2 or FINAL == 2)  # [BK]: the cache row, broadcast
    state = load_initial(H0, HAS, s, row, row_ok, h, kk, vv, sm, s0_s, s0_h, s0_k, s0_v, INIT, HAS_FLAG,
                         BK, BV)                                                  # [BK, BV] float32

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
        # token t decays by g summed over (t, chunk end], a direct sum (the last token's factor exactly 1)
        if GATE == 1:
            v = v * tl.exp(tl.sum(tl.where(t[:, None] > t[None, :], g[:, None], 0.0), 0))[:, None]
            state = state * tl.exp(tl.sum(g, 0))
        elif GATE == 2:
            gp = G_ + h * sg_h + kk[:, None] * sg_k
            gt = tl.load(gp + tok[None, :] * sg_t, mask=km[:, None] & tm[None, :], other=0.0).to(tl.float32)
            nm = km[:, None] & ((t < C - 1) & (t < n - i * C - 1))[None, :]               # inside the chunk
            nxt = tl.load(gp + (tok + 1)[None, :] * sg_t, mask=nm, other=0.0).to(tl.float32)  # [BK, C]: g of t + 1
            kt = kt.to(tl.float32) * tl.exp(tl.cumsum(nxt, 1, reverse=True))
            state = state * tl.exp(tl.sum(gt, 1))[:, None]
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

    store_final(HT, state, s, row, row_ok, h, kk, vv, sm, sf_s, sf_h, sf_k, sf_v, FINAL)


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
                gk = tl.load(G_ + tok[:, None] * sg_t + h * sg_h + kk[None, :] * sg_k, mask=tkm,
                             other=0.0).to(tl.float32)
                qf = q.to(tl.float32)
                acc += dot((qf * tl.exp(tl.cumsum(gk, 0))).to(hs.dtype), hs)
                sc += _key_scores(qf, k, gk, K_ + hk * sk_h + kk[None, :] * sk_k, G_ + h * sg_h + kk[None, :] * sg_k,
                                  sk_t, sg_t, start, n_c, km, False, C, SUB_)
            else:
                acc += dot(q, hs)
                sc += dot(q, tl.trans(k))
        if GATE == 1:
            acc *= tl.exp(tl.cumsum(g, 0))[:, None]
            sc *= tl.exp(tl.where(causal, _segsum(g, C), float("-inf")))
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

    def tables(self) -> dict:
        """The per-chunk kernels' keyword arguments of the packing (None for one sequence)."""
        return dict(CU=self.cu, OFFS=self.offs, SEQ=self.seq, NSEQ=self.nseq, VARLEN=self.varlen)

    def launch(self) -> dict:
        return {"num_warps": self.entry.num_warps, "num_stages": self.entry.num_stages, **dict(self.entry.options)}


def plan(x: torch.Tensor, cu_seqlens) -> Plan:
    """The chunks of tokens x [T, ...] packed by cu_seqlens, tables built on the device."""
    e = recurrent(x)
    c, n_tok = e.chunk, x.shape[0]
    if cu_seqlens is None:
        return Plan(e, c, triton.cdiv(n_tok, c), 1, None, None, None)
    nseq = cu_seqlens.shape[0] - 1
    (cu_seqlens,) = dense(cu_seqlens)  # the kernels read it by bare offsets
    ends = cu_seqlens.clamp(0, n_tok)
    lens = (ends[1:] - ends[:-1]).clamp(min=0)
    offs = torch.zeros(nseq + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(torch.div(lens + (c - 1), c, rounding_mode="floor"), 0, out=offs[1:])
    n_chunks = n_tok // c + nseq
    seq = torch.searchsorted(offs[1:], torch.arange(n_chunks, dtype=torch.int32, device=x.device), right=True,
                             out_int32=True)
    return Plan(e, c, n_chunks, nseq, cu_seqlens, offs, seq)


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


def gate_args(g, ssd: Ssd | None) -> dict:
    """The decay's keyword arguments: G_ [T, H(, K)] and its strides, and GATE (0 no decay, 1 per head,
    2 per key dim; SSD decays per head by d A, without g)."""
    gate = 1 if ssd is not None else (0 if g is None else (2 if g.dim() == 3 else 1))
    return dict(G_=g, sg_t=stride(g, 0), sg_h=stride(g, 1), sg_k=stride(g, 2), GATE=gate)


def _ssd_args(ssd: Ssd | None) -> dict:
    """SSD's dt keyword arguments (DT, DTB, A_, their strides, the dt limits, SSD, SOFTPLUS, HAS_BIAS)."""
    dt, dtb, a = (ssd.dt, ssd.dt_bias, ssd.A) if ssd is not None else (None, None, None)
    lo, hi = ssd.limit if ssd is not None else (0.0, 0.0)
    return dict(DT=dt, DTB=dtb, A_=a, sd_t=stride(dt, 0), sd_h=stride(dt, 1), sdb=stride(dtb, 0), sa=stride(a, 0),
                lo=float(lo), hi=float(hi), SSD=ssd is not None, SOFTPLUS=ssd is not None and ssd.softplus,
                HAS_BIAS=dtb is not None)


def state_pass(p: Plan, k, v, g, st: States, n_heads: int, kdim: int, vdim: int, *, ssd: Ssd | None = None,
               wu=None) -> tuple:
    """Run `_chunk_state`: returns (hbuf [chunks, H, K, V] activation dtype, v_new or None).
    wu = (w, u) switches on the delta rule (whole key dim per program; v_new in the activation dtype, laid out
    as u, which replaces v)."""
    e = p.entry
    delta = wu is not None
    bk = max(triton.next_power_of_2(kdim), e.min_dot) if delta else e.block_k
    # a whole-key state tile holds at most twice a [block_k, block_v] tile (registers)
    bv = max(e.min_dot, min(e.block_v, 2 * e.block_k * e.block_v // bk)) if delta else e.block_v
    hbuf = torch.empty((p.n_chunks, n_heads, kdim, vdim), dtype=k.dtype, device=k.device)
    w, u = wu if delta else (None, None)
    v = None if delta else v
    vnew = torch.empty(u.shape, dtype=k.dtype, device=k.device) if delta else None
    if p.nseq == 0:
        return hbuf, vnew
    grid = (p.nseq, n_heads, triton.cdiv(kdim, bk) * triton.cdiv(vdim, bv))
    _chunk_state[grid](
        K_=k, V_=v, W_=w, U_=u, VNEW=vnew, HBUF=hbuf, CU=p.cu, OFFS=p.offs,
        sk_t=k.stride(0), sk_h=k.stride(1), sk_k=k.stride(2), sv_t=stride(v, 0), sv_h=stride(v, 1),
        sv_v=stride(v, 2), sw_t=stride(w, 0), sw_h=stride(w, 1), sw_k=stride(w, 2), su_t=stride(u, 0),
        su_h=stride(u, 1), su_v=stride(u, 2), s_hc=hbuf.stride(0), s_hh=hbuf.stride(1), s_hk=hbuf.stride(2),
        T=k.shape[0], K=kdim, V=vdim, NC=p.n_chunks,
        **gate_args(g, ssd), **_ssd_args(ssd), **st.args(),
        GROUP=n_heads // k.shape[1], DELTA=delta, VARLEN=p.varlen, C=p.chunk, BK=bk, BV=bv, **p.launch())
    return hbuf, vnew


def output_pass(p: Plan, q, k, v, g, hbuf, o, scale: float, *, ssd: Ssd | None = None) -> None:
    """Run `_chunk_output` into o [T, H, V] (any strides)."""
    if p.n_chunks == 0:
        return
    e = p.entry
    n_heads, kdim, vdim = hbuf.shape[1:]
    D, z = (ssd.D, ssd.z) if ssd is not None else (None, None)
    grid = (p.n_chunks, n_heads, triton.cdiv(vdim, e.block_v))
    _chunk_output[grid](
        Q_=q, K_=k, V_=v, D_=D, Z_=z, O_=o, HBUF=hbuf,
        sq_t=q.stride(0), sq_h=q.stride(1), sq_k=q.stride(2), sk_t=k.stride(0), sk_h=k.stride(1),
        sk_k=k.stride(2), sv_t=v.stride(0), sv_h=v.stride(1), sv_v=v.stride(2), sD_h=stride(D, 0),
        sD_v=stride(D, 1), sz_t=stride(z, 0), sz_h=stride(z, 1), sz_v=stride(z, 2), so_t=o.stride(0),
        so_h=o.stride(1), so_v=o.stride(2), s_hc=hbuf.stride(0), s_hh=hbuf.stride(1), s_hk=hbuf.stride(2),
        T=q.shape[0], K=kdim, V=vdim, scale=float(scale),
        **gate_args(g, ssd), **_ssd_args(ssd), **p.tables(),
        GROUP=n_heads // k.shape[1], HAS_D=D is not None, HAS_Z=z is not None, C=p.chunk, BK=e.block_k,
        BV=e.block_v, SUB_=SUB, **p.launch())
