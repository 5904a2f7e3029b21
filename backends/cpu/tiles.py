"""The core the cpu attention ops share: one fused-kernel call over some queries and the keys they can
see, partial results over disjoint key sets merged by log-sum-exp, and block-mask visibility per tile.

Layouts are torch's attention layout `[B, H, L, D]`; callers pass strided views of their token-major
inputs. Nothing here materialises more than the (query tile x visible keys) scores of one call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from portable_attn.envs import lookup
from portable_attn.masks import EMPTY
from portable_attn.torch_features import cpu_flash_shares_kv_heads

from .native import BUILT, SWITCH

NEG = -math.inf
SCORE_BUDGET = 1 << 20  # score elements per step of the explicit (softcap) path: 4 MiB of float32

flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def bounds(cu: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence; one sequence when `cu` is None."""
    if cu is None:
        return [(0, total)]
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def attend(q, k, v, vis, scale: float, softcap: float, causal: bool = False):
    """q [B, Hq, L, D], k [B, Hkv, K, D], v [B, Hkv, K, Dv]; vis None (all visible) or bool
    [B|1, Hq|1, L|1, K]; `causal`: query i sees key i and before (no vis, no softcap).

    Returns o [B, Hq, L, Dv] (q's dtype or float32) and lse [B, Hq, L] float32; a row that sees
    nothing gets o = 0, lse = -inf.
    """
    b, hq, lq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if nk == 0 or lq == 0 or b == 0:
        return q.new_zeros(b, hq, lq, dv), q.new_full((b, hq, lq), NEG, dtype=torch.float32)
    if causal and scale == 0:  # the kernel's own causal mask turns into NaN at scale 0
        vis, causal = torch.ones(lq, nk, dtype=torch.bool).tril()[None, None], False
    g = hq // hkv
    if g > 1 and causal and not cpu_flash_shares_kv_heads():  # older torch (2.8) misreads shared kv heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if g > 1 and not causal:  # the g query heads of a kv head as one block of rows: each kv head read once
        q = q.reshape(b, hkv, g * lq, d)
        if vis is not None:
            vis = vis.expand(vis.shape[0], vis.shape[1], lq, nk)
            vis = (vis.reshape(vis.shape[0], hkv, g * lq, nk) if vis.shape[1] == hq
                   else vis[:, :, None].expand(-1, -1, g, -1, -1).reshape(vis.shape[0], 1, g * lq, nk))
    o, lse = (_explicit if softcap > 0 else _fused)(q, k, v, vis, scale, softcap, causal)
    return o.reshape(b, hq, lq, dv), lse.reshape(b, hq, lq)


def heads_first(x, batch: int = 1):
    """The view [batch, H, L, D] of a token-major x [batch * L, H, D] (one op: these views are made per call)."""
    (n, h, d), (s0, s1, s2) = x.shape, x.stride()
    return x.as_strided((batch, h, n // batch, d), (n // batch * s0, s1, s0, s2), x.storage_offset())


def unit(x):
    """x with a contiguous last axis: the kernel assumes one (and silently misreads others)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _fused(q, k, v, vis, scale, softcap, causal):
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:  # the kernel wants one head dim: zero columns change neither scores nor outputs
        v = F.pad(v, (0, d - dv))
    elif dv > d:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    bias = None if vis is None else torch.zeros(vis.shape, dtype=q.dtype).masked_fill_(~vis, NEG)
    o, lse = flash(unit(q), unit(k), unit(v), 0.0, causal, attn_mask=bias, scale=scale)
    if vis is not None:
        lse = lse.masked_fill(~vis.any(-1), NEG)  # the kernel reports lse = 0 for a row with no key
    return (o if dv == d else o[..., :dv]), lse


def _explicit(q, k, v, vis, scale, softcap, causal):
    """Scores in float32 (softcap needs them), a step of rows x keys at a time small enough to stay in
    the core's cache (SCORE_BUDGET), each step in place; partial results over key chunks merged by lse."""
    b, h, r, _ = q.shape
    nk = k.shape[2]
    o = q.new_empty(b, h, r, v.shape[-1], dtype=torch.float32)
    lse = q.new_empty(b, h, r, dtype=torch.float32)
    step_k = -(-nk // -(-r * nk // SCORE_BUDGET))   # key chunks of equal length, each within the budget
    heads = max(1, SCORE_BUDGET // (r * step_k))    # (batch, head) pairs per step, a multiple of the threads where
    threads = torch.get_num_threads()               # more (the products split them: 3 on 2 threads ran 1.4x of 1)
    heads -= heads % threads if heads > threads else 0
    qs = q.float() * (scale / softcap)              # tanh's argument straight out of the product
    hidden = None if vis is None else ~vis
    for i, hs in _row_steps(b, h, heads):
        bi = (slice(i[0], i[1]), hs)
        ot = lt = None
        for j in range(0, nk, step_k):
            keys = slice(j, j + step_k)
            s = qs[bi] @ k[bi][..., keys, :].float().transpose(-1, -2)  # [b', h', R, keys]
            m, total = _capped_softmax(s, None if hidden is None else _part(hidden, bi)[..., keys], softcap)
            # P @ V with P rounded to v's dtype (what a low-precision kernel does), accumulated in float32
            part = (s.to(v.dtype) @ v[bi][..., keys, :]).float().div_(total.clamp(min=torch.finfo(s.dtype).tiny))
            part_lse = (m + total.log()).squeeze(-1)
            ot, lt = (part, part_lse) if ot is None else merge(ot, lt, part, part_lse)
        o[bi], lse[bi] = ot, lt
    return o, lse


def _capped_softmax(s, hidden, softcap: float):
    """s [b, h, R, K] float32 (scores / softcap) -> exp(softcap * tanh(s) - m) in place, 0 where `hidden`
    [b|1, h|1, R|1, K]; returns the row max m (finite for a row seeing nothing) and the row sum, [b, h, R, 1]."""
    kernels = BUILT[lookup(SWITCH)]
    if kernels is not None:  # one pass per row (softcap.cpp): torch's tanh alone cost more than the products
        m, total = s.new_empty(s.shape[:-1]), s.new_empty(s.shape[:-1])
        kernels.softcap_softmax(s, hidden, softcap, m, total)
        return m[..., None], total[..., None]
    s.tanh_().mul_(softcap)
    if hidden is not None:
        s.masked_fill_(hidden, NEG)
    m = s.amax(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)
    s.sub_(m).exp_()
    return m, s.sum(-1, keepdim=True)


def _row_steps(b: int, h: int, per: int):
    """((b0, b1), head slice) covering [b, h] in steps of about `per` (batch, head) pairs."""
    if per >= h:
        nb = per // h
        return [((i, min(b, i + nb)), slice(None)) for i in range(0, b, nb)]
    return [((i, i + 1), slice(j, j + per)) for i in range(b) for j in range(0, h, per)]


def _part(vis, bi):
    """Rows `bi` (batch slice, head slice) of a mask vis [B|1, H|1, R|1, K], broadcasting kept."""
    bs, hs = bi
    return vis[bs if vis.shape[0] > 1 else slice(None), hs if vis.shape[1] > 1 else slice(None)]


def _weight(lse, total):
    """exp(lse - total), 0 where the total is -inf (nothing seen anywhere)."""
    return torch.where(total > NEG, torch.exp(lse - total), 0.0)[..., None]


def merge(o1, lse1, o2, lse2):
    """Attention over the union of two disjoint key sets from the results over each (float32)."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * _weight(lse1, lse) + o2 * _weight(lse2, lse), lse


def add_sinks(o, lse, sinks):
    """Join the per-head sink logits `sinks [Hq]` to the denominator; o [B, Hq, L, Dv], lse [B, Hq, L]."""
    if sinks is None:
        return o, lse
    total = torch.logaddexp(lse, sinks.float()[:, None])
    return o * _weight(lse, total), total


def store(o, lse, t0: int, ot, lt, sinks) -> None:
    """Write n tiles of r rows, ot [n, Hq, r, Dv] and lt [n, Hq, r], to query rows t0 .. t0 + n*r of
    o [Tq, Hq, Dv] and lse [Hq, Tq] (None: not wanted), joining the sinks first."""
    ot, lt = add_sinks(ot, lt, sinks)
    n, hq, r, dv = ot.shape
    o[t0:t0 + n * r].view(n, r, hq, dv).copy_(ot.transpose(1, 2))
    if lse is not None:
        lse[:, t0:t0 + n * r].view(hq, n, r).copy_(lt.transpose(0, 1))


def lse_rows(lse, start: int, end: int):
    """The columns start .. end of lse [Hq, Tq], or None when lse is not wanted."""
    return None if lse is None else lse[:, start:end]


def band_vis(p, j, causal: bool, window: tuple[int, int]):
    """Causal/window visibility bool [1, len(p), len(j)] of query positions p and key positions j,
    or None when every pair is visible."""
    left, right = window
    if not causal and left < 0 and right < 0:
        return None
    diff = (j[None, :] - p[:, None])[None]  # j - p
    vis = torch.ones(diff.shape, dtype=torch.bool)
    if causal:
        vis &= diff <= 0
    if left >= 0:
        vis &= diff >= -left
    if right >= 0:
        vis &= diff <= right
    return None if bool(vis.all()) else vis


def unseen(vis, hkv: int):
    """The keys no query row of `vis` [B, Hq|1, R, K] sees, per kv head: bool [B, K, Hkv|1], or None."""
    seen = vis.any(-2)
    if seen.shape[1] > 1:
        seen = seen.view(seen.shape[0], hkv, seen.shape[1] // hkv, seen.shape[-1]).any(2)
    return None if bool(seen.all()) else ~seen.transpose(1, 2)


def clear(dead, *xs) -> list:
    """Gathered keys and values xs with the entries where `dead` (their leading axes; a last axis of 1
    spans the rest) zeroed, in place when contiguous: memory no query sees may hold NaN or Inf, which a
    masked score or a zero weight would still carry (0 * NaN = NaN). index_fill_ on row numbers: a
    bool-mask assignment costs a pass over all of x."""
    dead = dead[..., 0] if dead.shape[-1] == 1 else dead
    rows = dead.flatten().nonzero().squeeze(1)
    xs = [x.contiguous() for x in xs]
    for x in xs:
        x.view(dead.numel(), -1).index_fill_(0, rows, 0)
    return xs


def block_keys(bm, s: int, p, lo: int, hi: int):
    """Key positions in [lo, hi) of blocks that `bm` leaves non-EMPTY for some query position in p."""
    bq, bk = bm.block_size
    lay = bm.layout[s if bm.layout.shape[0] > 1 else 0]  # [Hm, nqb, nkb]
    p = p[(p >= 0) & (p < lay.shape[1] * bq)]            # positions outside the layout see nothing
    if p.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    rows = lay[:, int(p[0]) // bq:int(p[-1]) // bq + 1]
    blocks = (rows != EMPTY).flatten(0, 1).any(0)         # [nkb]
    j = torch.arange(lo, min(hi, lay.shape[2] * bk))
    return j[blocks.index_select(0, j // bk)]
