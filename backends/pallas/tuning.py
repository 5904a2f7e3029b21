"""Block sizes per TPU generation, picked in one place. Kernels see them as static parameters.
Attention family: `block_q` queries x `block_k` keys per step of the flash kernel, both multiples of the
TPU's (8, 128) tiling where the kernel picks them; head dims padded to 128 lanes.

The entries are starting points from the TPUs' matrix-unit sizes (128 x 128 on v4/v5e/v5p, 256 x 256 on
v6e) and VMEM, not yet measured on this project's kernels. The interpret entry is small so that the
tests' tiny shapes span several chunks and sub-chunks.
"""
from __future__ import annotations

import dataclasses

import jax

from .compat import on_tpu

GENERATIONS = ("v4", "v5e", "v5p", "v6e")


def generation() -> str:
    """'v4', 'v5e', 'v5p', 'v6e' from the first TPU's device kind; 'interpret' without a TPU."""
    if not on_tpu():
        return "interpret"
    kind = jax.devices()[0].device_kind.lower()          # e.g. "TPU v5 lite", "TPU v5p", "TPU v6 lite"
    if "v6" in kind:
        return "v6e"
    if "v5" in kind:
        return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
    if "v4" in kind:
        return "v4"
    raise ValueError(f"no pallas block-size table for TPU kind {kind!r}")


# ---- recurrent family (linear attention, gated delta rule, SSD) ---------------------------------

@dataclasses.dataclass(frozen=True)
class Recurrent:
    chunk: int   # tokens per chunk: the intra-chunk products are chunk x chunk (a multiple of 16 and of sub)
    sub: int     # sub-chunk of the per-key-dim decay scores (a power of two)


RECURRENT = {
    # chunk 128: the MXU width of v4/v5e/v5p (half of v6e's), and the products that contract the chunk
    # (k^T v into the state) transpose whole 128 x 128 tiles
    "v4": Recurrent(chunk=128, sub=16),
    "v5e": Recurrent(chunk=128, sub=16),
    "v5p": Recurrent(chunk=128, sub=16),
    "v6e": Recurrent(chunk=128, sub=16),
    # the tests' shapes then span several chunks and sub-chunks
    "interpret": Recurrent(chunk=32, sub=8),
}


def recurrent(gen: str | None = None) -> Recurrent:
    return RECURRENT[gen or generation()]


# ---- attention family (flash kernel of attention / paged_attention, top-k kernel) ---------------

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class Attention:
    block_q: int          # queries per step
    block_k: int          # keys per step
    sparse_queries: int   # queries per step of the top-k kernel


ATTENTION = {
    # splash attention's published block sizes: 512 where VMEM allows, 256 on the small-VMEM v5e
    "v4": Attention(block_q=256, block_k=512, sparse_queries=8),
    "v5e": Attention(block_q=256, block_k=256, sparse_queries=8),
    "v5p": Attention(block_q=512, block_k=512, sparse_queries=8),
    "v6e": Attention(block_q=512, block_k=512, sparse_queries=8),
    # every interpreted grid step costs ~10 ms: one step covers a smoke case's keys; the tests pass
    # smaller tiles to reach the multi-tile and skipping paths
    "interpret": Attention(block_q=64, block_k=128, sparse_queries=8),
}


def attention(gen: str | None = None) -> Attention:
    return ATTENTION[gen or generation()]


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(limit: int, mask_block: int | None, step: int) -> int | None:
    """The largest multiple of `step` up to `limit` that divides `mask_block` (None: there is none)."""
    if mask_block is None:
        return limit
    for t in range(min(limit, mask_block) // step * step, 0, -step):
        if mask_block % t == 0:
            return t
    return None


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    block_q: int
    block_k: int
    head_dim: int     # D padded to lanes
    head_dim_v: int   # Dv padded to lanes


def flash_tiles(*, max_q: int | None, head_dim: int, head_dim_v: int, mask_block=None, page_size=None,
                table: Attention | None = None) -> FlashTiles | str:
    """Tiles of the flash kernel, or the reason there are none. A block mask's blocks must be whole
    multiples of the tiles (each tile pair then lies inside one mask block); `page_size` pins block_k
    to a page (the kernel then reads the pages in place)."""
    e = table or attention()
    bq_m, bk_m = mask_block if mask_block is not None else (None, None)
    limit_q = e.block_q if max_q is None else min(e.block_q, max(SUBLANES, round_up(max_q, SUBLANES)))
    bq = _tile(limit_q, bq_m, SUBLANES)
    if bq is None:
        return f"block mask query blocks of {bq_m} are not a multiple of {SUBLANES} (the TPU's sublane tiling)"
    bk = page_size or _tile(e.block_k, bk_m, SUBLANES)
    if bk is None:
        return f"block mask key blocks of {bk_m} are not a multiple of {SUBLANES} (the TPU's sublane tiling)"
    return FlashTiles(bq, bk, round_up(head_dim, LANES), round_up(head_dim_v, LANES))
