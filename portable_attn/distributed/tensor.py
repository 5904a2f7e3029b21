"""Tensor parallelism: which heads, and which of the groups they read, each rank holds.

Every op maps a head to the group it reads with `group = head // (heads // groups)` (query -> kv head
in attention, value -> q/k head in the gated delta rule, SSD head -> B/C group). Sharding the heads
over ranks in contiguous, balanced slices, a rank needs the groups of its heads; when its heads do not
fall evenly into those groups (heads or groups not divisible by the world size), the groups are
replicated, one per local head, so that the op's rule holds on the rank (as vLLM's Mamba helpers do
for B/C groups, and its attention for kv heads when there are fewer kv heads than ranks). Per-head
math is independent, so the sharded op computes exactly the single-device heads; the layer's output
projection then reduces over ranks as usual.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """One rank's share: `heads`, a slice of the head axis; `groups`, int64 indices into the group axis
    (in the order the local heads read them; repeats where replicated)."""
    heads: slice
    groups: torch.Tensor

    def channels(self, *segments: tuple[str, int, int]) -> torch.Tensor:
        """Channel indices of a packed projection made of segments `(kind, width, count)`, kind "heads"
        or "groups": e.g. Mamba-2's conv input `[x | B | C]` is
        `("heads", P, H), ("groups", N, G), ("groups", N, G)`, Qwen3-Next's `[q | k | v]` is
        `("groups", K, H), ("groups", K, H), ("heads", V, Hv)`."""
        out, offset = [], 0
        for kind, width, count in segments:
            if kind not in ("heads", "groups"):
                raise ValueError(f"segments: kind must be 'heads' or 'groups', got {kind!r}")
            items = torch.arange(count)[self.heads] if kind == "heads" else self.groups
            out.append(offset + (items[:, None] * width + torch.arange(width)).reshape(-1))
            offset += width * count
        return torch.cat(out)


def shard_heads(heads: int, groups: int, world: int, rank: int) -> HeadShard:
    """The heads and groups rank `rank` of `world` holds, for an op whose `heads` read `groups`
    (`heads % groups == 0`). Head slices are contiguous and differ in size by at most one.

    Example:
        >>> from portable_attn.distributed import shard_heads
        >>> [shard_heads(9, 3, 2, r).groups.tolist() for r in range(2)]   # heads 0-3 and 4-8 of 3 groups
        [[0, 0, 0, 1], [1, 1, 2, 2, 2]]
    """
    if heads < 1 or groups < 1 or heads % groups:
        raise ValueError(f"heads, groups: expected positive counts with groups dividing heads, got {heads}, {groups}")
    if not 0 <= rank < world or world > heads:
        raise ValueError(f"rank, world: expected 0 <= rank < world <= heads ({heads}) so that every rank has a "
                         f"head, got rank {rank}, world {world}")
    a, b = rank * heads // world, (rank + 1) * heads // world
    read = torch.arange(a, b) // (heads // groups)                   # the group each local head reads
    distinct, counts = read.unique_consecutive(return_counts=True)
    even = bool((counts == counts[0]).all())
    return HeadShard(slice(a, b), distinct if even else read)
