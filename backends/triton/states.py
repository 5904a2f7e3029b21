"""State plumbing of the chunked recurrences (SPEC "States", docs/spec.md): on the host, where a call's
initial states come from and its final states go (`States`, `route`); in the state kernel, the state
tile entering a sequence (`load_initial`: zero, `initial_state[s]`, or cache row `state_indices[s]` where
`has_initial_state[s]`) and the one leaving it (`store_final`: a new `final_state[s]`, or the cache row in
place). A cache row of -1 (or, with checks off, outside the cache) reads as zero and is never written.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .common import dense, stride

NONE, PER_SEQUENCE, CACHE = 0, 1, 2  # the INIT and FINAL constexprs


@dataclasses.dataclass
class States:
    """Where initial states come from and final states go; swap: the state is [V, K], read through
    swapped strides as [K, V]."""
    init: torch.Tensor | None
    idx: torch.Tensor | None
    has: torch.Tensor | None
    final: torch.Tensor | None   # what the op returns as final_state
    swap: bool = False

    def args(self) -> dict:
        """The state kernel's keyword arguments: H0 (initial states or the cache), IDX, HAS, HT (where
        final states go), their [S, H, K, V] strides, NSLOTS and the INIT, HAS_FLAG, FINAL constexprs."""
        cached = self.idx is not None
        ht = self.init if cached else self.final
        k, v = (3, 2) if self.swap else (2, 3)
        return dict(H0=self.init, IDX=self.idx, HAS=self.has, HT=ht,
                    s0_s=stride(self.init, 0), s0_h=stride(self.init, 1), s0_k=stride(self.init, k),
                    s0_v=stride(self.init, v),
                    sf_s=stride(ht, 0), sf_h=stride(ht, 1), sf_k=stride(ht, k), sf_v=stride(ht, v),
                    NSLOTS=self.init.shape[0] if cached else 0,
                    INIT=CACHE if cached else (PER_SEQUENCE if self.init is not None else NONE),
                    HAS_FLAG=self.has is not None,
                    FINAL=CACHE if cached else (PER_SEQUENCE if self.final is not None else NONE))


def route(initial_state, state_indices, has_initial_state, output_final_state, nseq: int, tail: tuple, device,
          swap: bool = False) -> States:
    """The state plumbing of a call; a new final_state [S, *tail] is allocated when one is returned."""
    if state_indices is not None:
        state_indices, has_initial_state = dense(state_indices, has_initial_state)  # read by bare offsets
        return States(initial_state, state_indices, has_initial_state,
                      initial_state if output_final_state else None, swap)
    final = None
    if output_final_state:
        dtype = initial_state.dtype if initial_state is not None else torch.float32
        final = torch.empty((nseq,) + tuple(tail), dtype=dtype, device=device)
    return States(initial_state, None, None, final, swap)


@triton.jit
def cache_row(IDX, s, kk, NSLOTS, CACHED: tl.constexpr):
    """Cache row IDX[s] broadcast over the key dims kk [BK] (int64, 0 where outside the cache) and whether
    it lies in the cache; without a cache (not CACHED) row 0, never used."""
    if CACHED:
        row = tl.load(IDX + s + kk * 0)
        ok = (row >= 0) & (row < NSLOTS)
        row = tl.where(ok, row, 0).to(tl.int64)
    else:
        row = (kk * 0).to(tl.int64)
        ok = kk < 0
    return row, ok


@triton.jit
def load_initial(H0, HAS, s, row, row_ok, h, kk, vv, sm, s0_s, s0_h, s0_k, s0_v,
                 INIT: tl.constexpr, HAS_FLAG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The float32 state tile [BK, BV] (key dims kk, value dims vv, mask sm) entering sequence s: zero
    (INIT 0), initial_state[s] (1) or cache row `row` (2: zero unless row_ok and has_initial_state[s])."""
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if INIT == 1:
        state = tl.load(H0 + s.to(tl.int64) * s0_s + h * s0_h + kk[:, None] * s0_k + vv[None, :] * s0_v,
                        mask=sm, other=0.0).to(tl.float32)
    elif INIT == 2:
        read = row_ok
        if HAS_FLAG:
            read = read & (tl.load(HAS + s + kk * 0) != 0)
        state = tl.load(H0 + row[:, None] * s0_s + h * s0_h + kk[:, None] * s0_k + vv[None, :] * s0_v,
                        mask=sm & read[:, None], other=0.0).to(tl.float32)
    return state


@triton.jit
def store_final(HT, state, s, row, row_ok, h, kk, vv, sm, sf_s, sf_h, sf_k, sf_v, FINAL: tl.constexpr):
    """Store the state tile leaving sequence s: nowhere (FINAL 0), final_state[s] (1) or, in place, cache
    row `row` where row_ok (2), in the destination's dtype."""
    if FINAL == 1:
        tl.store(HT + s.to(tl.int64) * sf_s + h * sf_h + kk[:, None] * sf_k + vv[None, :] * sf_v,
                 state.to(HT.dtype.element_ty), mask=sm)
    elif FINAL == 2:
        tl.store(HT + row[:, None] * sf_s + h * sf_h + kk[:, None] * sf_k + vv[None, :] * sf_v,
                 state.to(HT.dtype.element_ty), mask=sm & row_ok[:, None])
