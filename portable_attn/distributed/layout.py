"""Where the tokens of a packed varlen batch live when its sequence axis is split over ranks.

Each sequence is cut into `2 * world` chunks and rank r holds chunks r and 2*world-1-r (the "zigzag"
layout of load-balanced ring attention): under a causal mask the early chunk is cheap and the late
one expensive, so every rank gets about the same work. Chunk boundaries are multiples of `align`
(a block mask's block sizes need it) except at the sequence's end. Everything here is host data,
the same on every rank.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Chunk:
    seq: int     # the sequence (index into cu_seqlens)
    start: int   # first position in the sequence
    end: int     # one past the last position
    row: int     # first row in its rank's local tokens

    @property
    def length(self) -> int:
        return self.end - self.start


class ContextLayout:
    """The zigzag split of a packed batch (`cu_seqlens`, host ints or an int tensor) over `world` ranks."""

    def __init__(self, cu_seqlens, world: int, *, align: int = 1):
        cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing ints starting at 0, got {cu}")
        if not (isinstance(world, int) and world >= 1):
            raise ValueError(f"world: expected a positive int, got {world!r}")
        if not (isinstance(align, int) and align >= 1):
            raise ValueError(f"align: expected a positive int, got {align!r}")
        self.cu_seqlens, self.world, self.align = tuple(cu), world, align
        rows = [0] * world
        chunks: list[list[Chunk]] = [[] for _ in range(world)]
        for s, (a, b) in enumerate(zip(cu, cu[1:])):
            bounds = self.bounds(b - a)
            for r in range(world):
                for c in (r, 2 * world - 1 - r):
                    chunks[r].append(Chunk(s, bounds[c], bounds[c + 1], rows[r]))
                    rows[r] += bounds[c + 1] - bounds[c]
        self.chunks = tuple(tuple(c) for c in chunks)

    def bounds(self, length: int) -> list[int]:
        """The 2*world + 1 chunk boundaries of a sequence of `length` positions."""
        n = 2 * self.world
        return [min(length, (i * length // n) // self.align * self.align) for i in range(n)] + [length]

    def tokens(self, rank: int) -> int:
        """How many tokens rank `rank` holds."""
        return sum(c.length for c in self.chunks[rank])

    def rows(self, rank: int) -> torch.Tensor:
        """int64 [tokens(rank)]: the global packed row of each local token."""
        parts = [np.arange(self.cu_seqlens[c.seq] + c.start, self.cu_seqlens[c.seq] + c.end) for c in self.chunks[rank]]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64)).long()

    def local_cu_seqlens(self, rank: int, device=None) -> torch.Tensor:
        """int32 [2*S + 1]: the local tokens as packed chunks (each chunk one sequence of a local call)."""
        cu = np.cumsum([0] + [c.length for c in self.chunks[rank]])
        return torch.tensor(cu, dtype=torch.int32, device=device)

    @functools.cached_property
    def owners(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (rank, local row) of each of its positions."""
        out = []
        for s, (a, b) in enumerate(zip(self.cu_seqlens, self.cu_seqlens[1:])):
            rank, row = np.zeros(b - a, np.int64), np.zeros(b - a, np.int64)
            for r, chunks in enumerate(self.chunks):
                for c in chunks:
                    if c.seq == s:
                        rank[c.start:c.end] = r
                        row[c.start:c.end] = np.arange(c.row, c.row + c.length)
            out.append((rank, row))
        return out

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s tokens of a global packed tensor `x [T, ...]`."""
        return x[self.rows(rank).to(x.device)]

    def unshard(self, parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The global packed tensor from every rank's part (along `dim`: 0 for outputs, 1 for lse [H, T])."""
        shape = list(parts[0].shape)
        shape[dim] = self.cu_seqlens[-1]
        out = parts[0].new_empty(shape)
        for r, p in enumerate(parts):
            out.index_copy_(dim, self.rows(r).to(p.device), p)
        return out
