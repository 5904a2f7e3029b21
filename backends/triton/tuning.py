"""Launch parameters per vendor, picked from the inputs' platform in one place (`entry`). Kernels hold
no vendor branches: they see tile sizes as constexprs and the launcher gets the vendor's options.

Rows of a query tile are (query heads of one kv group) x (queries); `block_m` is the target row
count, `block_n` the keys per step. `min_dot` is the smallest dot dimension the compilers take (16 on
the GPUs' matrix units; the interpreter takes any, but uses 16 too so that it runs the GPUs' padding
paths). `max_rows` caps the rows of one tile. The GPU entries are starting points from the vendors'
published flash-attention configurations, not yet measured on this project's kernels.
"""
from __future__ import annotations

import dataclasses

import triton

from portable_attn.platforms import Platform, platform_of

from .common import INTERPRET


@dataclasses.dataclass(frozen=True)
class Entry:
    block_m: int                 # target rows of a query tile (heads x queries)
    block_n: int                 # keys per step
    num_warps: int
    num_stages: int
    min_dot: int = 16            # smallest tile side a tl.dot accepts
    max_rows: int = 128          # most rows one tile may hold
    big_head_block_m: int = 64   # block_m and block_n for padded head dims above 128 (registers and
    big_head_block_n: int = 32   # shared memory: q and the accumulator stay in registers)
    options: tuple = ()          # vendor launch options, (name, value) pairs


TABLES = {
    # Triton's interpreter: small tiles, so that the tiny shapes of the tests still span several tiles
    # and every tile/mask path runs, with the GPUs' 16-wide dot minimum (the same padding paths run);
    # no launch options (the interpreter drops them anyway).
    "interpret": Entry(block_m=16, block_n=16, num_warps=1, num_stages=1, min_dot=16, max_rows=64,
                       big_head_block_m=16, big_head_block_n=16),
    # NVIDIA (Ampere/Hopper): the FlashAttention-2 tile of the Triton tutorial.
    Platform.CUDA: Entry(block_m=128, block_n=64, num_warps=8, num_stages=3, big_head_block_n=32),
    # AMD CDNA (wave64): fewer warps per tile of the same size, software pipelining off, two waves/SIMD.
    Platform.ROCM: Entry(block_m=128, block_n=64, num_warps=4, num_stages=1, big_head_block_n=32,
                         options=(("waves_per_eu", 2),)),
    # Intel Xe (PVC): 16 warps (sub-groups) on the large register file (`grf_mode`: Intel's compiler
    # otherwise starts at the default file and rebuilds with the large one only after a spill). Its 2D
    # block loads (`portable-attn info` shows whether the device has them) are emitted for block pointers
    # and tensor descriptors; these kernels load through pointer arithmetic and do not get them yet.
    Platform.XPU: Entry(block_m=128, block_n=64, num_warps=16, num_stages=2, big_head_block_n=32,
                        options=(("grf_mode", "large"),)),
}


def entry(x, tables: dict = TABLES):
    """The entry of `tables` (default: the attention kernels') for the platform of tensor `x` (the
    interpreter's when interpreting)."""
    if INTERPRET:
        return tables["interpret"]
    platform = platform_of(x)
    if platform not in tables:
        raise ValueError(f"no triton launch table for platform {platform.value}")
    return tables[platform]


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    block_q: int      # queries per tile
    block_h: int      # head slots per tile (a power of two >= the heads packed; extra rows are padding)
    heads: int        # query heads packed in one tile (divides the group size)
    block_n: int      # keys per step
    block_d: int      # padded head dim of q/k
    block_dv: int     # padded head dim of v
    launch: dict      # num_warps, num_stages and vendor options
    mask_rows: int = 0  # with a block mask: query positions per row of the mask tables (see flash.py)

    @property
    def rows(self) -> int:
        return self.block_q * self.block_h


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def flash_tiles(x, *, group: int, max_q: int, head_dim: int, head_dim_v: int, mask_block=None) -> FlashTiles:
    """Tiles of the flash forward kernel for queries `x` with `group` query heads per kv head, the
    longest sequence holding `max_q` queries, and an optional block mask of block size (bq, bk)."""
    e = entry(x)
    block_d = max(triton.next_power_of_2(head_dim), e.min_dot)
    block_dv = max(triton.next_power_of_2(head_dim_v), e.min_dot)
    big = max(block_d, block_dv) > 128
    block_m = e.big_head_block_m if big else e.block_m
    block_n = e.big_head_block_n if big else e.block_n
    num_stages = e.num_stages
    if x.element_size() == 4:  # float32 K/V tiles take twice the shared memory per stage
        block_n = max(e.min_dot, block_n // 2)
        num_stages = min(num_stages, 2)
    # heads of one group in a tile: all of them, or the largest divisor of the group that fits
    heads = group
    while heads > e.max_rows or group % heads:
        heads -= 1
    block_h = triton.next_power_of_2(heads)
    block_q = max(1, min(block_m // block_h, triton.next_power_of_2(max(max_q, 1))))
    mask_rows = 0
    if mask_block is not None:
        bq, bk = mask_block
        # tables per mask query block when the tile divides it (a tile then lies inside one block),
        # else per query tile, over every block the tile covers (odd or small blocks: 1, 3, 24, ...)
        mask_rows = bq if _pow2_divisor(bq, block_q) == block_q else block_q
        # key steps of the mask's key blocks where they are a power of two in range: FULL blocks
        # then need no element mask
        if bk & (bk - 1) == 0 and e.min_dot <= bk <= block_n:
            block_n = bk
    block_n = max(block_n, e.min_dot)
    # pad the head slots until the tile has the rows a dot needs
    block_h = max(block_h, triton.cdiv(e.min_dot, block_q))
    launch = {"num_warps": e.num_warps if block_q * block_h >= 64 else max(1, min(e.num_warps, 4)),
              "num_stages": num_stages, **dict(e.options)}
    return FlashTiles(block_q, block_h, heads, block_n, block_d, block_dv, launch, mask_rows)


@dataclasses.dataclass(frozen=True)
class RecurrentEntry:
    """Launch parameters of the recurrent kernels (chunked sequence forms, step forms, conv1d)."""
    chunk: int        # tokens per chunk of the chunked forms (a multiple of min_dot)
    block_k: int      # key dims (state rows) per program
    block_v: int      # value dims (state columns) per program
    block_t: int      # tokens per program of causal_conv1d
    block_c: int      # channels per program of causal_conv1d
    step_block_c: int  # channels per program of causal_conv1d_step (capped at conv.TILE window elements); the
                       # GPU entries give a thread 16 window elements at W=4 (sm_90: 64-72 registers, 7-8 programs/SM)
    num_warps: int
    num_stages: int
    min_dot: int = 16
    options: tuple = ()


RECURRENT = {
    # small tiles so that the tests' tiny shapes span several chunks and several k/v blocks
    "interpret": RecurrentEntry(chunk=16, block_k=16, block_v=16, block_t=8, block_c=16, step_block_c=16,
                                num_warps=1, num_stages=1),
    # H200 sweep (ci/tune_triton.py; BENCHMARKS.md): 8 warps slower for the chunked and step kernels,
    # step_block_c 256 and 512 alike and 1024 slower, block_v 32 within the noise of 64
    Platform.CUDA: RecurrentEntry(chunk=64, block_k=64, block_v=64, block_t=64, block_c=128, step_block_c=512,
                                  num_warps=4, num_stages=2),
    Platform.ROCM: RecurrentEntry(chunk=64, block_k=64, block_v=64, block_t=64, block_c=128, step_block_c=1024,
                                  num_warps=4, num_stages=1, options=(("waves_per_eu", 2),)),
    Platform.XPU: RecurrentEntry(chunk=64, block_k=64, block_v=64, block_t=64, block_c=128, step_block_c=1024,
                                 num_warps=8, num_stages=2, options=(("grf_mode", "large"),)),
}


def recurrent(x) -> RecurrentEntry:
    """The recurrent kernels' entry for the platform of tensor `x` (the interpreter's when interpreting)."""
    return entry(x, RECURRENT)
