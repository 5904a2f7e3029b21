"""Chunked form of the decaying recurrences on the TPU (linear attention / GLA, SSD, the gated delta rule).

Packing (XLA, under jit): every sequence is cut into chunks of C tokens. A chunk table with the static
bound NC = T // C + S chunks (jnp ops, no host round trip) gives each chunk its sequence and whether it
is the sequence's first or last; every sequence has at least one chunk (an empty one passes its state
through). Inputs are gathered head-major [H, NC * C, F], F padded to 128 lanes with zeros and the slots
past a sequence's end zero: zero keys, values, betas and log-decays leave the state as it is, zero
padded lanes stay zero in the state.
Kernel: grid (heads, chunks), chunks sequential; the float32 state [K, V] lives in VMEM scratch across
chunks, loaded from the initial states at a sequence's first chunk and stored at its last. Within a
chunk the recurrence is masked C x C products on the MXU. A decay between two tokens is the exponential
of a segment sum, the log-decays between them added up (masked products with 0/1 matrices, or sums),
never the difference of two cumulative sums: log-decays <= 0 then give non-positive sums without
cancellation, so the error does not grow with |g|, strong decays underflow to zero instead of
overflowing, and -inf (clamped to NEG, a factor of exactly 0) never meets -inf - -inf.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .compat import interpret, pl, pltpu
from .tuning import LANES, round_up

F32 = jnp.float32
_DOT = dict(precision=lax.Precision.HIGHEST, preferred_element_type=F32)


def pad_last(x, *dims):
    """Zero-pad the trailing len(dims) axes of x up to multiples of 128."""
    extra = [(0, 0)] * (x.ndim - len(dims)) + [(0, round_up(d, LANES) - d) for d in dims]
    return jnp.pad(x, extra)


# ---- packing ---------------------------------------------------------------------------------------

class Table(NamedTuple):
    seq: jax.Array     # [NC] int32 the sequence of each chunk (chunks past the last one: the last sequence)
    first: jax.Array   # [NC] int32 1 at a sequence's first chunk
    last: jax.Array    # [NC] int32 1 at a sequence's last chunk
    tok: jax.Array     # [NC * C] int32 the token in each slot (T: a zero row)
    pos: jax.Array     # [T] int32 the slot of each token


def table(n_tok: int, cu_seqlens, chunk: int) -> Table:
    if cu_seqlens is None:
        cu, nc = jnp.array([0, n_tok], jnp.int32), max(-(-n_tok // chunk), 1)
    else:
        cu, nc = cu_seqlens.astype(jnp.int32), n_tok // chunk + cu_seqlens.shape[0] - 1
    nseq = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    counts = jnp.maximum(-(-lens // chunk), 1)                              # chunks per sequence, >= 1
    ends = jnp.cumsum(counts, dtype=jnp.int32)
    starts = ends - counts
    c = jnp.arange(nc, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, c, side="right"), nseq - 1).astype(jnp.int32)
    j = c - starts[seq]                                                     # chunk within its sequence
    live = c < ends[-1]
    first = ((j == 0) & live).astype(jnp.int32)
    last = ((j == counts[seq] - 1) & live).astype(jnp.int32)
    valid = jnp.clip(lens[seq] - j * chunk, 0, chunk)                       # tokens in the chunk
    i = jnp.arange(chunk, dtype=jnp.int32)
    tok = jnp.where(i < valid[:, None], (cu[seq] + j * chunk)[:, None] + i, n_tok).reshape(-1)
    t = jnp.arange(n_tok, dtype=jnp.int32)
    s_t = jnp.searchsorted(cu[1:], t, side="right")                         # the sequence of each token
    within = t - cu[s_t]
    pos = ((starts[s_t] + within // chunk) * chunk + within % chunk).astype(jnp.int32)
    return Table(seq, first, last, tok, pos)


def tokens(x, tab: Table):
    """[T, H(, F)] -> [H, NC * C, F padded to 128 lanes | 1], in x's dtype; empty slots zero."""
    rows = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[tab.tok]   # [NC * C, H(, F)]
    rows = jnp.moveaxis(rows, 1, 0)
    return rows[..., None] if rows.ndim == 2 else pad_last(rows, rows.shape[-1])


def untokens(y, tab: Table, f: int):
    """[H, NC * C, F'] -> [T, H, f]."""
    return jnp.moveaxis(jnp.take(y, tab.pos, axis=1)[..., :f], 0, 1)


NEG = -1e30  # a log-decay of -inf: exp gives 0 all the same, and 0 * NEG in the masked products stays 0


def decays(g, tab: Table, chunk: int):
    """The log-decays as the kernels take them (float32, -inf clamped to NEG):
    per head, g [T, H] -> (a token input [H, NC*C, 1], a chunk input: the same as rows [H, NC, 1, C]);
    per key dim, g [T, H, K] -> (g [H, NC*C, Kp], a chunk input: the chunk totals as columns [H, NC, Kp, 1])."""
    per_head = g.ndim == 2
    g = tokens(jnp.maximum(g.astype(F32), NEG), tab)
    h, ncc, f = g.shape
    if per_head:
        return g, g.reshape(h, ncc // chunk, 1, chunk)
    return g, jnp.swapaxes(jnp.sum(g.reshape(h, ncc // chunk, chunk, f), axis=2, keepdims=True), 2, 3)


# ---- in-kernel pieces --------------------------------------------------------------------------------

def dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), **_DOT)


def dot_nt(a, b):
    """a @ b^T."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), **_DOT)


def dot_tn(a, b):
    """a^T @ b (contracting the chunk's tokens)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), **_DOT)


def iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def ones_where(mask):
    return jnp.where(mask, 1.0, 0.0).astype(F32)


class Decay:
    """A chunk's log-decays g inside the kernel and the factors they give, each the exponential of a
    segment sum. kind None (no decay), "head" (refs: g as a column [C, 1] and as a row [1, C]) or "key"
    (refs: g [C, Kp] and the chunk totals as a column [Kp, 1])."""

    def __init__(self, kind, refs, sub: int):
        self.kind, self.sub = kind, sub
        if kind is None:
            return
        ref, other = refs
        self.g = ref[...]
        c = self.g.shape[0]
        row, col = iota((c, c), 0), iota((c, c), 1)
        if kind == "head":                                        # lane sums of the row [1, C]
            g_row = other[...]
            self.start = jnp.sum(jnp.where(col <= row, g_row, 0.0), axis=1, keepdims=True)   # [C, 1] (.., t]
            self.end = jnp.sum(jnp.where(col > row, g_row, 0.0), axis=1, keepdims=True)      # [C, 1] (t, ..]
            self.total = jnp.sum(g_row, axis=1, keepdims=True)                                # [1, 1]
        else:                                                     # 0/1 matrices times g [C, Kp]
            self.start = dot(ones_where(col <= row), self.g)
            self.end = dot(ones_where(col > row), self.g)
            self.total = other[...]                                                           # [Kp, 1]

    def from_start(self, x):
        """x_t exp(g_0 + .. + g_t): from the chunk's start to token t."""
        return x if self.kind is None else x * jnp.exp(self.start)

    def to_end(self, x):
        """x_t exp(g_{t+1} + .. + g_{C-1}): from token t to the chunk's end."""
        return x if self.kind is None else x * jnp.exp(self.end)

    def whole(self, s):
        """The state [Kp, Vp] decayed over the whole chunk."""
        return s if self.kind is None else s * jnp.exp(self.total)

    def scores(self, queries: list, b) -> list:
        """For each a [C, Kp] in `queries`: S[i, j] = sum_k a_ik b_jk exp(g_{j+1} + .. + g_i) for j <= i, else 0."""
        c = b.shape[0]
        if self.kind == "key":
            return self._scores_per_key(queries, b)
        row, col = iota((c, c), 0), iota((c, c), 1)
        if self.kind is None:
            return [jnp.where(col <= row, dot_nt(a, b), 0.0) for a in queries]
        seg = dot(ones_where(col <= row), jnp.where(row > col, self.g, 0.0))   # [i, j]: g_{j+1} + .. + g_i
        decay = jnp.exp(jnp.where(col <= row, seg, -jnp.inf))
        return [dot_nt(a, b) * decay for a in queries]

    def _scores_per_key(self, queries, b):
        """Per-key-dim decays in sub-chunks of `sub` tokens. Earlier sub-chunks J (last token r): one product
        per J, exp(g_{r+1} + .. + g_i) exp(g_{j+1} + .. + g_r), both factors at most 1; the first built from
        the last J down by adding whole sub-chunks. Pairs within a sub-chunk: one diagonal offset d at a time,
        exp(g_{i-d+1} + .. + g_i) elementwise (rows rolled by d)."""
        g, sub = self.g, self.sub
        c, k = g.shape
        shift = sub.bit_length() - 1
        rows = iota((c, k), 0)
        blk, off = rows >> shift, rows & (sub - 1)
        row, col = iota((c, c), 0), iota((c, c), 1)
        same = (row >> shift) == (col >> shift)
        local = dot(ones_where(same & (col <= row)), g)              # (sub-chunk start, t]
        rest = dot(ones_where(same & (col > row)), g)                # (t, sub-chunk end]
        out = [jnp.zeros((c, c), F32) for _ in queries]
        after = local                                                # rows past J: (J's last token, t]
        for J in reversed(range(c // sub - 1)):
            total = jnp.sum(jnp.where(rows == (J + 2) * sub - 1, local, 0.0), axis=0, keepdims=True)  # J+1's
            after = jnp.where(blk > J + 1, after + total, local)
            kj = b * jnp.exp(jnp.where(blk == J, rest, -jnp.inf))                  # rows of J only
            out = [o + dot_nt(a * jnp.exp(jnp.where(blk > J, after, -jnp.inf)), kj) for o, a in zip(out, queries)]
        seg = jnp.zeros_like(g)                                      # (t - d, t]
        for d in range(sub):
            if d:
                seg = seg + (g if d == 1 else pltpu.roll(g, d - 1, 0))
            bd = b if d == 0 else pltpu.roll(b, d, 0)                # row i: token i - d
            e = bd * jnp.exp(jnp.where(off >= d, seg, -jnp.inf))
            band = col == row - d
            out = [o + jnp.where(band, jnp.sum(a * e, axis=1, keepdims=True), 0.0) for o, a in zip(out, queries)]
        return out


def unit_lower_inverse(n):
    """(I + n)^-1 for a strictly lower-triangular n [C, C] by recursive doubling: t holds the inverses of
    the diagonal blocks of size b (b = 1: the identity); two neighbouring blocks A, B merge into one of
    size 2b with t_BA = -t_BB n_BA t_AA (exact block elimination, two products per level, log2(C) levels)."""
    c = n.shape[0]
    row, col = iota((c, c), 0), iota((c, c), 1)
    t = (row == col).astype(F32)
    level = 0                                                     # b = 2**level
    while (1 << level) < c:
        pair = ((row >> (level + 1)) == (col >> (level + 1))) & ((row >> level) & 1 == 1) & ((col >> level) & 1 == 0)
        t = t - dot(t, dot(jnp.where(pair, n, 0.0), t))
        level += 1
    return t


# ---- the sweep -----------------------------------------------------------------------------------------

def sweep(body, tab: Table, chunk: int, heads: int, token_inputs: list, chunk_inputs: list, init,
          out_dtype):
    """Run `body(token_refs, chunk_refs, s [Kp, Vp]) -> (o [C, Vp] float32, new state)` over every
    (head, chunk) of the table.

    token_inputs: [Hx, NC * C, F] arrays, Hx dividing `heads` (grouped heads: head h reads h // (heads // Hx));
    chunk_inputs: [heads, NC, A, B]; init: float32 [S, heads, Kp, Vp], every sequence's initial state.
    Returns o [heads, NC * C, Vp] in out_dtype and the final states, float32 [S, heads, Kp, Vp]."""
    nc = tab.seq.shape[0]
    kp, vp = init.shape[2:]

    def token_spec(x):
        r = heads // x.shape[0]
        return pl.BlockSpec((None, chunk, x.shape[2]), lambda h, c, *_: (lax.div(h, r), c, 0))

    def chunk_spec(x):
        return pl.BlockSpec((None, None) + x.shape[2:], lambda h, c, *_: (h, c, 0, 0))

    state_spec = pl.BlockSpec((None, None, kp, vp), lambda h, c, seq, first, last: (seq[c], h, 0, 0))
    nt, nk = len(token_inputs), len(chunk_inputs)

    def kernel(seq_ref, first_ref, last_ref, *refs):
        toks, chunks, init_ref = refs[:nt], refs[nt:nt + nk], refs[nt + nk]
        o_ref, final_ref, s_ref = refs[nt + nk + 1:]
        c = pl.program_id(1)

        @pl.when(first_ref[c] == 1)
        def _():
            s_ref[...] = init_ref[...]

        o, s = body(toks, chunks, s_ref[...])
        o_ref[...] = o.astype(o_ref.dtype)
        s_ref[...] = s

        @pl.when(last_ref[c] == 1)
        def _():
            final_ref[...] = s

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(heads, nc),
        in_specs=[token_spec(x) for x in token_inputs] + [chunk_spec(x) for x in chunk_inputs] + [state_spec],
        out_specs=[pl.BlockSpec((None, chunk, vp), lambda h, c, *_: (h, c, 0)), state_spec],
        scratch_shapes=[pltpu.VMEM((kp, vp), F32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((heads, nc * chunk, vp), out_dtype), jax.ShapeDtypeStruct(init.shape, F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret(),
    )(tab.seq, tab.first, tab.last, *token_inputs, *chunk_inputs, init)


def decay_inputs(g, tab: Table, chunk: int):
    """(kind, token inputs, chunk inputs) of a log-decay g: None, [T, H] or [T, H, K]."""
    if g is None:
        return None, [], []
    per_token, per_chunk = decays(g, tab, chunk)
    return ("head" if g.ndim == 2 else "key"), [per_token], [per_chunk]
