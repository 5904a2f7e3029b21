"""Chunked matrix forms of the decaying recurrences (linear attention / GLA, the delta rule, SSD).

A sequence is processed in blocks of at most BLOCK tokens (bounded, cache-sized intermediates), each
cut into NC chunks of C tokens laid out [NC, H, C, F] (the last chunk zero-padded: zero keys, values,
betas and log-decays leave the state as it is). Within a chunk the recurrence is a masked matrix
product; between chunks the state is passed on. A decay between two tokens is exp of a sum of the
log-decays between them (prefix, suffix or segment sums within a chunk), never of a difference of two
cumulative sums: sums of log-decays <= 0 do not cancel, so the error does not grow with |g|, strong
decays underflow to zero instead of overflowing, and g = -inf gives a factor 0 (never inf - inf).
Grouped heads: q/k (or C/B) tensors with Hg heads serve H = r * Hg heads, head h reading h // r.
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK = 64    # tokens per chunk (a multiple of SUB)
SUB = 16      # sub-chunk of the per-key-dim decay scores (GLA, KDA); a short block's chunks round up to it
BLOCK = 256   # tokens per block (a multiple of CHUNK)
SPAN = 120.0  # largest per-key-dim decay over one chunk taken in one product (factors within exp(+-60))


def sweep(step: Callable, y: torch.Tensor, start: int, end: int, s: torch.Tensor) -> torch.Tensor:
    """Run `step(a, b, c, s) -> (o [NC, H, C, F], s)` over the blocks [a, b) of tokens [start, end), with
    chunk length c, writing o into y[a:b]; returns the final state."""
    for a in range(start, end, BLOCK):
        b = min(a + BLOCK, end)
        o, s = step(a, b, min(CHUNK, -(-(b - a) // SUB) * SUB), s)  # a short block: shorter chunks
        for tokens, chunks in _pairs(y[a:b], o):
            tokens.copy_(chunks)
    return s


def _pairs(x: torch.Tensor, chunks: torch.Tensor):
    """Matching views of tokens x [L, H, *F] and chunks [NC, H, C, *F]: the full chunks, the ragged last one."""
    n, c = x.shape[0], chunks.shape[2]
    full = n // c
    yield x[:full * c].unflatten(0, (full, c)), chunks[:full].transpose(1, 2)
    if full * c < n:
        yield x[full * c:], chunks[full].transpose(0, 1)[:n - full * c]


def split(x: torch.Tensor, c: int) -> torch.Tensor:
    """[L, H, *F] -> float32 [NC, H, C, *F], the last chunk zero-padded (one pass)."""
    n = x.shape[0]
    nc = -(-n // c)
    chunks = torch.empty((nc, x.shape[1], c) + tuple(x.shape[2:]), dtype=torch.float32, device=x.device)
    for tokens, part in _pairs(x, chunks):
        part.copy_(tokens)
    if nc * c > n:
        chunks[-1].transpose(0, 1)[n - (nc - 1) * c:].zero_()
    return chunks


def after(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of x over the positions after each along `dim` (0 at the last), accumulated from the end."""
    n = x.shape[dim]
    tail = x.narrow(dim, 1, n - 1).flip(dim).cumsum_(dim).flip(dim)   # from each of positions 1.. to the end
    return torch.cat([tail, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [..., C, C]: S[i, j] = sum of x_t for j < t <= i (0 on and above the diagonal)."""
    return x[..., :, None].expand(x.shape + x.shape[-1:]).tril(-1).cumsum_(-2)


def per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped [NC, Hg, C, F] -> [NC, H, C, F]."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def scaled(x: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """per_head(x, H) * f for grouped x [NC, Hg, C, F] and per-head factors f [NC, H, C, 1|F], in one pass (the
    repeated heads never copied), into `out` [NC, H, C, F] when given."""
    nc, hg = x.shape[:2]
    group = (nc, hg, f.shape[1] // hg)
    if out is None:
        out = torch.empty(f.shape[:3] + x.shape[3:], dtype=torch.float32, device=x.device)
    torch.mul(x[:, :, None], f.view(group + f.shape[2:]), out=out.view(group + out.shape[2:]))
    return out


def scores(queries: list, b: torch.Tensor, g: torch.Tensor) -> list:
    """For each a in `queries`: S[i, j] = sum_k a_ik b_jk exp(g_{j+1} + ... + g_i) for j <= i, else 0.

    a, b [NC, Hg, C, K]; log-decays g [NC, H, C] (per head) or [NC, H, C, K] (per key dim) -> [NC, H, C, C] each.
    """
    nc, h, c = g.shape[:3]
    if g.dim() == 4:
        return _scores_per_key([per_head(a, h) for a in queries], per_head(b, h), g)
    decay = segment_sums(g).exp_().tril_()                                                  # [NC, H, C, C]
    decay = decay.view(nc, b.shape[1], -1, c, c)          # the decay factors out of the grouped dot products
    return [(decay * (a @ b.transpose(-1, -2))[:, :, None]).view(nc, h, c, c) for a in queries]


def _scores_per_key(queries, b, g):
    """`scores` with per-key-dim decays, exp(G_i - G_j) = exp(G_i - r) exp(r - G_j) for a reference r, G the
    cumulative log-decay from token 1 (token 0's decay never enters a score). Where every chunk's decay span
    is at most SPAN, one product with r mid-span (both factors within exp(+-SPAN/2)); else in sub-chunks
    of SUB tokens with r between j and i (both factors <= 1, each a sum of log-decays), the pairs inside
    a sub-chunk summed elementwise, one offset at a time."""
    nc, h, c, k = b.shape
    G = torch.cat([g.new_zeros(nc, h, 1, k), g[:, :, 1:]], dim=2).cumsum_(2)    # [NC, H, C, K]
    hi, lo = G.amax(2, keepdim=True), G.amin(2, keepdim=True)                     # [NC, H, 1, K]
    if float((hi - lo).max()) <= SPAN:
        r = (hi + lo) / 2
        bk = (b * (r - G).exp()).transpose(-1, -2)                                  # [NC, H, K, C]
        upper = torch.ones(c, c, dtype=torch.bool, device=b.device).triu_(1)
        return [((a * (G - r).exp()) @ bk).masked_fill_(upper, 0.0) for a in queries]
    sub, nb = SUB, c // SUB
    gs = g.view(nc, h, nb, sub, k)
    into = gs.cumsum(3)                          # [NC, H, nb, sub, K] log-decay from the sub-chunk's start to i
    out_of = after(gs, 3)                        # from j to its sub-chunk's end
    seg = segment_sums(into[:, :, :, -1].transpose(-1, -2))                      # [NC, H, K, nb, nb] whole sub-chunks
    later = torch.ones(nb, nb, dtype=torch.bool, device=b.device).triu_()
    between = torch.cat([seg[..., :1, :], seg[..., :-1, :]], dim=3).masked_fill_(later, -torch.inf)
    # between[s, s'] = log-decay of the sub-chunks strictly between s' and s, -inf where s' >= s
    between = between.permute(0, 1, 3, 4, 2)[:, :, :, :, None]                   # [NC, H, nb, nb, 1, K]
    kb = ((between + out_of[:, :, None]).exp_().view(nc, h, nb, c, k) * b[:, :, None]).transpose(-1, -2)
    qdecay = into.exp_()                                                        # [NC, H, nb, sub, K]
    out = [((a.view(nc, h, nb, sub, k) * qdecay) @ kb).view(nc, h, c, c) for a in queries]  # earlier sub-chunks
    within = torch.arange(c, device=b.device) % sub
    step = g[:, :, 1:].exp()                                   # exp(g_t), t >= 1
    span = torch.ones_like(b)                                  # span[j] = exp(g_{j+1} + .. + g_{j+d}): steps' product
    for d in range(sub):                                       # pairs (i, i - d) in one sub-chunk
        if d:
            span = span[:, :, :c - d] * step[:, :, d - 1:]
        bd = span * b[:, :, :c - d]
        for a, s in zip(queries, out):
            s.diagonal(-d, -2, -1).add_(torch.linalg.vecdot(a[:, :, d:], bd) * (within[d:] >= d))
    return out


def _factors(g: torch.Tensor):
    """Decay factors of a block from its log-decays g [NC, H, C(, K)]: exp(sum up to and including each
    token) [NC, H, C, 1|K] (from the chunk start), exp(sum after it) (to the chunk end) and exp(the
    chunk's sum) as [NC, H, 1|K, 1] (the whole chunk, scaling a state's rows)."""
    gk = g[..., None] if g.dim() == 3 else g
    G = gk.cumsum(2)
    return G.exp(), after(gk, 2).exp_(), G[:, :, -1:].exp().transpose(-1, -2)


def _bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """[NC, H, M, K] @ [NC, H, K, N] as one batched product, added into `acc` [NC, H, M, N] when given."""
    if acc is None:
        return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(a.shape[:-1] + b.shape[-1:])
    acc.flatten(0, 1).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))
    return acc


def linear(q, k, v, g, s0):
    """Linear attention / GLA over one block, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t (q
    scaled). q, k [NC, Hg, C, K]; v [NC, H, C, V]; log-decays g [NC, H, C(, K)]; s0 [H, K, V] float32.
    Returns o [NC, H, C, V] and the final state [H, K, V]."""
    nc, h = v.shape[:2]
    from_start, to_end, whole = _factors(g)
    (aqk,) = scores([q], k, g)
    states = torch.empty((nc + 1,) + tuple(s0.shape), device=v.device)   # states[i]: entering chunk i
    states[0] = s0
    states[1:] = _bmm(scaled(k, to_end).transpose(-1, -2), v)             # each chunk's own contribution
    for i in range(nc):
        states[i + 1].addcmul_(whole[i], states[i])
    return _bmm(scaled(q, from_start), states[:-1], _bmm(aqk, v)), states[nc]


def delta(q, k, v, g, beta, s0):
    """The gated delta rule over one block (the WY/UT form of flash-linear-attention's
    chunk_gated_delta_rule; per-key-dim g is KDA). q (scaled), k [NC, Hg, C, K]; v [NC, H, C, V];
    log-decays g [NC, H, C(, K)]; beta [NC, H, C]; s0 [H, K, V] float32. Returns o [NC, H, C, V] and the final state.

    In a chunk entered with state S_0, G_t the log-decays summed from the chunk start to t:
    u_t = beta_t (v_t - exp(G_t) S_0^T k_t - sum_{j<t} A_tj u_j),
    A_tj = exp(G_t - G_j) k_t.k_j, so (I + beta A) u = beta v - beta exp(G) k S_0 and u = U - W S_0,
    U and W from the inverse of the unit-triangular matrix (the solve ignores A's diagonal)."""
    nc, h, c, vd = v.shape
    from_start, to_end, whole = _factors(g)
    bcol = beta[..., None]
    akk, aqk = scores([k, q], k, g)
    rhs = torch.empty(v.shape[:-1] + (vd + q.shape[-1],), device=v.device)          # [NC, H, C, V + K]
    torch.mul(v, bcol, out=rhs[..., :vd])
    scaled(k, from_start * bcol, out=rhs[..., vd:])
    eye = torch.eye(c, device=v.device).expand_as(akk)
    inverse = torch.linalg.solve_triangular(akk.mul_(bcol), eye, upper=False, unitriangular=True)  # (I + beta A)^-1
    U, W = _bmm(inverse, rhs).split([vd, q.shape[-1]], -1)
    kd = scaled(k, to_end).transpose(-1, -2)                                       # [NC, H, K, C]
    states = torch.empty((nc + 1,) + tuple(s0.shape), device=v.device)            # states[i]: entering chunk i
    states[0] = s0
    u = torch.empty_like(v)
    for i in range(nc):
        torch.baddbmm(U[i], W[i], states[i], alpha=-1, out=u[i])                  # u = U - W S_0
        torch.baddbmm(states[i] * whole[i], kd[i], u[i], out=states[i + 1])        # exp(G_C) S_0 + kd u
    o = _bmm(scaled(q, from_start), states[:-1], _bmm(aqk, u))                    # q exp(G) S_0 + Aqk u
    return o, states[nc]
