"""causal_conv1d over packed varlen sequences, and its decode step.

Sequence form, two launches. Pass 1, grid (token tiles, channel tiles), one pass over the packed tokens:
each token finds its sequence by a binary search of cu_seqlens (on the device: no tile table, no host
sync, tiles may span sequence ends), then sums its W taps; a tap before the sequence start reads the
initial state (column W-1 + (p - start)). Pass 2, grid (sequences, channel tiles), writes the final
states (the last W-1 inputs, reaching into the initial state for a sequence shorter than W-1): a later
launch, so no program of pass 1 still reads a cache row it rewrites, and a barrier between its loads and
stores, since a short sequence's final state reads the row it overwrites.
Step: grid (bsz, channel tiles of `step_block_c`, a few hundred channels). A program reads its part of
cache row `state_indices[b]` once, as the window [BC, next_pow2(W)] = [state columns 0..W-2, x], writes
y and stores that same tile one column to the left (column m into state column m-1: the window shifted,
x the newest), again loads, barrier, stores. A row of W-1 elements is no power of two, so accesses stay
per element, but a warp's load or store covers the whole windows of adjacent channels (8 x 4 at W=4):
one contiguous run of the row. Dense rows ([C, W-1] contiguous, the usual cache) take offsets from
the tile's start known at compile time (W is a constexpr): one base address per thread, fewer
registers, more programs resident; other layouts use their strides.
A row of -1 (or, with checks off, outside the cache) reads as zero and is never written.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import dense, silu, stride
from .tuning import recurrent

TILE = 4096  # most window elements (channels x columns) one program holds
NO_STATE, PER_SEQUENCE, CACHE = 0, 1, 2


@triton.jit
def _state_rows(seq, idx_ptr, has_ptr, idx_s, has_s, SLOTS, STATE: tl.constexpr, HAS_FLAGS: tl.constexpr):
    """(row, read) of the initial state of sequences `seq`: row seq, or cache row state_indices[seq]
    read where it lies in the cache (and has_initial_state says so)."""
    if STATE == 2:
        row = tl.load(idx_ptr + seq * idx_s).to(tl.int64)
        read = (row >= 0) & (row < SLOTS)
        if HAS_FLAGS:
            read = read & (tl.load(has_ptr + seq * has_s) != 0)
        return tl.where(read, row, 0), read
    return seq.to(tl.int64), seq >= 0


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, cu_ptr, s_ptr, idx_ptr, has_ptr, y_ptr,
                 x_st, x_sc, w_sc, w_sw, cu_s, s_ss, s_sc, s_sw, idx_s, has_s, y_st, y_sc,
                 T, C, W, NSEQ, SLOTS, STEPS,
                 VARLEN: tl.constexpr, STATE: tl.constexpr, HAS_FLAGS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tm, cm = t < T, c < C
    seq = tl.zeros([BLOCK_T], tl.int32)
    if VARLEN:  # the last sequence starting at or before t (empty sequences start where the next does)
        hi = tl.full([BLOCK_T], NSEQ - 1, tl.int32)
        for _ in range(STEPS):
            mid = (seq + hi + 1) // 2
            up = tl.load(cu_ptr + mid * cu_s, mask=tm, other=0) <= t
            seq = tl.where(up, mid, seq)
            hi = tl.where(up, hi, mid - 1)
        start = tl.load(cu_ptr + seq * cu_s, mask=tm, other=0)
    else:
        start = tl.zeros([BLOCK_T], tl.int32)
    if STATE != 0:
        row, read = _state_rows(seq, idx_ptr, has_ptr, idx_s, has_s, SLOTS, STATE, HAS_FLAGS)
    t64 = t.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for i in range(W):
        p = t64 - (W - 1) + i                                     # [BT] input position of tap i
        wi = tl.load(w_ptr + c * w_sc + i * w_sw, mask=cm, other=0.0).to(tl.float32)
        mx = (tm & (p >= start) & (p >= 0))[:, None] & cm[None, :]
        xi = tl.load(x_ptr + p[:, None] * x_st + c[None, :] * x_sc, mask=mx, other=0.0).to(tl.float32)
        if STATE != 0:
            j = p - start + (W - 1)                               # its state column, before the start
            ms = (tm & read & (p < start) & (j >= 0) & (j < W - 1))[:, None] & cm[None, :]
            xi += tl.load(s_ptr + row[:, None] * s_ss + c[None, :] * s_sc + j[:, None] * s_sw,
                          mask=ms, other=0.0).to(tl.float32)
        acc += wi[None, :] * xi
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = silu(acc)
    tl.store(y_ptr + t64[:, None] * y_st + c[None, :] * y_sc, acc.to(y_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _final_kernel(x_ptr, cu_ptr, s_ptr, idx_ptr, has_ptr, f_ptr,
                  x_st, x_sc, cu_s, s_ss, s_sc, s_sw, idx_s, has_s, f_ss, f_sc, f_sw,
                  T, C, W, SLOTS,
                  VARLEN: tl.constexpr, STATE: tl.constexpr, HAS_FLAGS: tl.constexpr, IN_PLACE: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    seq = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_W)                                     # final state column
    cm, jm = c < C, j < W - 1
    seqs = seq + tl.zeros([BLOCK_W], tl.int32)                    # as a vector: masks stay tensors
    if VARLEN:
        start = tl.load(cu_ptr + seqs * cu_s)
        end = tl.load(cu_ptr + (seqs + 1) * cu_s)
    else:
        start, end = tl.zeros([BLOCK_W], tl.int32), tl.full([BLOCK_W], T, tl.int32)
    p = (end - (W - 1) + j).to(tl.int64)                          # [BW] input position of column j
    mx = (jm & (p >= start) & (p >= 0) & (p < T))[None, :] & cm[:, None]
    val = tl.load(x_ptr + p[None, :] * x_st + c[:, None] * x_sc, mask=mx, other=0.0).to(tl.float32)
    if STATE != 0:
        row, read = _state_rows(seqs, idx_ptr, has_ptr, idx_s, has_s, SLOTS, STATE, HAS_FLAGS)
        col = p - start + (W - 1)                                 # the initial state's column
        ms = (jm & read & (p < start) & (col >= 0) & (col < W - 1))[None, :] & cm[:, None]
        val += tl.load(s_ptr + row[None, :] * s_ss + c[:, None] * s_sc + col[None, :] * s_sw,
                       mask=ms, other=0.0).to(tl.float32)
    if IN_PLACE:  # the cache row state_indices[seq], unless -1 (or outside the cache)
        out = tl.load(idx_ptr + seqs * idx_s).to(tl.int64)
        keep = (out >= 0) & (out < SLOTS)
        out = tl.where(keep, out, 0)
    else:
        out, keep = seqs.to(tl.int64), seqs >= 0
    tl.debug_barrier()  # every load of the row above is done before any store below
    tl.store(f_ptr + out[None, :] * f_ss + c[:, None] * f_sc + j[None, :] * f_sw, val.to(f_ptr.dtype.element_ty),
             mask=(jm & keep)[None, :] & cm[:, None])


@triton.jit(do_not_specialize=["x_sc"])  # x_sc == 1 would lay x's tile out along channels (see below)
def _step_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, idx_ptr, y_ptr,
                 x_sb, x_sc, w_sc, w_sw, s_ss, s_sc, s_sw, idx_s, y_sb, y_sc,
                 C, SLOTS,
                 W: tl.constexpr, DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    i = tl.arange(0, BLOCK_C)                                             # [BC] channel in the tile
    c = c0 + i
    m = tl.arange(0, BLOCK_W)                                             # [BW] window column
    cm = c < C
    row = tl.load(idx_ptr + b * idx_s).to(tl.int64)
    ok = (row >= 0) & (row < SLOTS)
    cols = tl.where(ok, W - 1, 0)                                         # state columns read and written
    s_row = s_ptr + tl.where(ok, row, 0) * s_ss
    if DENSE:  # [C, W-1] contiguous: offsets from the tile's first element known at compile time
        at = s_row + c0.to(tl.int64) * (W - 1) + i[:, None] * (W - 1) + m[None, :]   # [BC, BW]
        step = 1
    else:
        at = s_row + c[:, None] * s_sc + m[None, :] * s_sw
        step = s_sw
    # the window [state columns 0..W-2, x]; x's addresses run along m like the state's, so that the
    # [BC, BW] tiles share one layout (no conversion through shared memory)
    win = tl.load(at, mask=cm[:, None] & (m < cols)[None, :], other=0.0).to(tl.float32)
    win += tl.load(x_ptr + b * x_sb + c[:, None] * x_sc + (m - (W - 1))[None, :],
                   mask=cm[:, None] & (m == W - 1)[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c[:, None] * w_sc + m[None, :] * w_sw, mask=cm[:, None] & (m < W)[None, :],
                other=0.0).to(tl.float32)
    y = tl.sum(win * w, 1)                                                # [BC]
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if SILU:
        y = silu(y)
    tl.store(y_ptr + b * y_sb + c * y_sc, y.to(y_ptr.dtype.element_ty), mask=cm)
    tl.debug_barrier()  # every load of the row above is done before any store below
    # the window shifted by one: column m becomes state column m-1 (x the newest)
    tl.store(at - step, win.to(s_ptr.dtype.element_ty), mask=cm[:, None] & ((m >= 1) & (m <= cols))[None, :])


def _block_c(want: int, c: int, block_w: int) -> int:
    return max(1, min(want, triton.next_power_of_2(c), TILE // block_w))


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    n_tok, ch = x.shape
    wd = weight.shape[1]
    (bias,) = dense(bias)  # read by bare offsets
    nseq = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    e = recurrent(x)
    y = out if out is not None else x.new_empty(x.shape)
    state = NO_STATE if initial_state is None else (CACHE if state_indices is not None else PER_SEQUENCE)
    # what both passes read: x, the packing and the initial states
    common = dict(x_ptr=x, cu_ptr=cu_seqlens, s_ptr=initial_state, idx_ptr=state_indices,
                  has_ptr=has_initial_state, x_st=x.stride(0), x_sc=x.stride(1), cu_s=stride(cu_seqlens, 0),
                  s_ss=stride(initial_state, 0), s_sc=stride(initial_state, 1), s_sw=stride(initial_state, 2),
                  idx_s=stride(state_indices, 0), has_s=stride(has_initial_state, 0), T=n_tok, C=ch, W=wd,
                  SLOTS=0 if initial_state is None else initial_state.shape[0],
                  VARLEN=cu_seqlens is not None, STATE=state, HAS_FLAGS=has_initial_state is not None,
                  num_warps=e.num_warps, num_stages=1, **dict(e.options))
    block_c = _block_c(e.block_c, ch, 1)
    if n_tok and ch and nseq:
        _conv_kernel[(triton.cdiv(n_tok, e.block_t), triton.cdiv(ch, block_c))](
            w_ptr=weight, bias_ptr=bias, y_ptr=y, w_sc=weight.stride(0), w_sw=weight.stride(1), y_st=y.stride(0),
            y_sc=y.stride(1), NSEQ=nseq, STEPS=max(nseq - 1, 0).bit_length(), HAS_BIAS=bias is not None,
            SILU=activation == "silu", BLOCK_T=e.block_t, BLOCK_C=block_c, **common)
    if state_indices is not None:
        final = initial_state
    elif output_final_state:
        final = x.new_empty((nseq, ch, wd - 1), dtype=x.dtype if initial_state is None else initial_state.dtype)
    else:
        return y, None
    if wd > 1 and ch and nseq:
        block_w = triton.next_power_of_2(wd - 1)
        block_c = _block_c(e.block_c, ch, block_w)
        _final_kernel[(nseq, triton.cdiv(ch, block_c))](
            f_ptr=final, f_ss=final.stride(0), f_sc=final.stride(1), f_sw=final.stride(2),
            IN_PLACE=state_indices is not None, BLOCK_C=block_c, BLOCK_W=block_w, **common)
    return y, final if output_final_state else None


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None):
    bsz, ch = x.shape
    wd = weight.shape[1]
    (bias,) = dense(bias)  # read by bare offsets
    y = out if out is not None else x.new_empty(x.shape)
    if bsz == 0 or ch == 0:
        return y
    e = recurrent(x)
    block_w = triton.next_power_of_2(wd)
    block_c = _block_c(e.step_block_c, ch, block_w)
    dense_rows = wd == 1 or (state.stride(1) == wd - 1 and (wd == 2 or state.stride(2) == 1))
    _step_kernel[(bsz, triton.cdiv(ch, block_c))](
        x_ptr=x, w_ptr=weight, bias_ptr=bias, s_ptr=state, idx_ptr=state_indices, y_ptr=y,
        x_sb=x.stride(0), x_sc=x.stride(1), w_sc=weight.stride(0), w_sw=weight.stride(1), s_ss=state.stride(0),
        s_sc=state.stride(1), s_sw=state.stride(2), idx_s=state_indices.stride(0), y_sb=y.stride(0),
        y_sc=y.stride(1), C=ch, SLOTS=state.shape[0], W=wd, DENSE=dense_rows, HAS_BIAS=bias is not None,
        SILU=activation == "silu", BLOCK_C=block_c, BLOCK_W=block_w, num_warps=e.num_warps, num_stages=1,
        **dict(e.options))
    return y
