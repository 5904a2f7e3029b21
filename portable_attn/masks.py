"""BlockMask: block-sparse attention patterns over positions, as splash attention and FlexAttention hold them.

`layout[s, h, qb, kb]` is EMPTY (skipped), PARTIAL (element mask `partial_masks[partial_index[...]]`)
or FULL for query positions [qb*bq, (qb+1)*bq) and key positions [kb*bk, (kb+1)*bk). A leading axis
of size 1 broadcasts over sequences or heads. Constructors run on the host; `.to(device)` moves one.
Positions outside the layout (negative query positions, or beyond it) see nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BlockMask:
    block_size: tuple[int, int]
    layout: torch.Tensor          # int8 [S|1, H|1, nqb, nkb]
    partial_index: torch.Tensor   # int32, like layout, -1 where not PARTIAL
    partial_masks: torch.Tensor   # bool [M, bq, bk]
    seq_len: int | None = None    # positions a predicate was evaluated for; longer sequences are refused

    def __post_init__(self):
        bq, bk = self.block_size
        if not (isinstance(bq, int) and isinstance(bk, int) and bq >= 1 and bk >= 1):
            raise ValueError(f"block_size: expected two positive ints (bq, bk), got {self.block_size!r}")
        lay, idx, pm = self.layout, self.partial_index, self.partial_masks
        if not isinstance(lay, torch.Tensor) or lay.dim() != 4 or lay.dtype != torch.int8:
            raise ValueError(f"layout: expected an int8 tensor [S|1, H|1, nqb, nkb], got "
                             f"{getattr(lay, 'dtype', type(lay).__name__)} {tuple(getattr(lay, 'shape', ()))}")
        if not isinstance(idx, torch.Tensor) or idx.shape != lay.shape or idx.dtype != torch.int32:
            raise ValueError(f"partial_index: expected an int32 tensor of the layout's shape {tuple(lay.shape)}")
        if not isinstance(pm, torch.Tensor) or pm.dim() != 3 or pm.dtype != torch.bool or tuple(pm.shape[1:]) != (bq, bk):
            raise ValueError(f"partial_masks: expected a bool tensor [M, {bq}, {bk}], got "
                             f"{getattr(pm, 'dtype', None)} {tuple(getattr(pm, 'shape', ()))}")
        if not (lay.device == idx.device == pm.device):
            raise ValueError("layout, partial_index and partial_masks must be on one device")
        if lay.numel():
            if int(lay.min()) < EMPTY or int(lay.max()) > FULL:
                raise ValueError("layout: entries must be 0 (empty), 1 (partial) or 2 (full)")
            is_partial = lay == PARTIAL
            if bool((torch.where(is_partial, idx < 0, idx != -1)).any()):
                raise ValueError("partial_index: must be >= 0 exactly where layout is 1 (partial), -1 elsewhere")
            if is_partial.any() and int(idx[is_partial].max()) >= pm.shape[0]:
                raise ValueError(f"partial_index: refers to mask {int(idx.max())} but partial_masks holds "
                                 f"{pm.shape[0]}")

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_layout(cls, layout, block_size: tuple[int, int], partial_index=None, partial_masks=None) -> "BlockMask":
        """From a block-level layout [S|1, H|1, nqb, nkb] (or [nqb, nkb]) of 0/2 (or 0/1/2 with partials)."""
        layout = torch.as_tensor(layout)
        if layout.dtype == torch.bool:
            layout = layout.to(torch.int8) * FULL
        if layout.dtype.is_floating_point or layout.dtype.is_complex:
            raise ValueError(f"layout: expected an integer (or bool) tensor, got {layout.dtype}")
        if layout.dim() not in (2, 4):
            raise ValueError(f"layout: expected [S|1, H|1, nqb, nkb] or [nqb, nkb], got shape {tuple(layout.shape)}")
        # check the range before the int8 cast, which would wrap e.g. 258 to 2
        if layout.numel() and (int(layout.min()) < EMPTY or int(layout.max()) > FULL):
            raise ValueError("layout: entries must be 0 (empty), 1 (partial) or 2 (full)")
        squeeze = layout.dim() == 2
        layout = (layout[None, None] if squeeze else layout).to(torch.int8)
        bq, bk = block_size
        if (partial_index is None) != (partial_masks is None):
            raise ValueError("partial_index / partial_masks: give both or neither")
        if partial_index is None:
            if bool((layout == PARTIAL).any()):
                raise ValueError("layout: partial (1) blocks need partial_index and partial_masks")
            partial_index = torch.full(layout.shape, -1, dtype=torch.int32, device=layout.device)
            partial_masks = torch.zeros((0, bq, bk), dtype=torch.bool, device=layout.device)
        partial_index, partial_masks = torch.as_tensor(partial_index), torch.as_tensor(partial_masks)
        if partial_index.dtype.is_floating_point or partial_index.dtype == torch.bool:
            raise ValueError(f"partial_index: expected an integer tensor, got {partial_index.dtype}")
        if squeeze and partial_index.dim() == 2:
            partial_index = partial_index[None, None]
        if tuple(partial_index.shape) != tuple(layout.shape):
            raise ValueError(f"partial_index: expected the layout's shape {tuple(layout.shape)}, "
                             f"got {tuple(partial_index.shape)}")
        if partial_masks.dtype != torch.bool:
            raise ValueError(f"partial_masks: expected a bool tensor [M, {bq}, {bk}], got {partial_masks.dtype}")
        return cls((bq, bk), layout, partial_index.to(torch.int32), partial_masks)

    @classmethod
    def from_mask_mod(cls, mask_mod: MaskMod, seq_len: int, block_size: tuple[int, int] = (64, 64),
                      num_seqs: int = 1, num_heads: int = 1) -> "BlockMask":
        """Exact block mask of an element predicate `mask_mod(s, h, p, j) -> bool` (broadcasting tensors)."""
        bq, bk = block_size
        nqb, nkb = math.ceil(seq_len / bq), math.ceil(seq_len / bk)
        layout = torch.zeros((num_seqs, num_heads, nqb, nkb), dtype=torch.int8)
        index = torch.full(layout.shape, -1, dtype=torch.int32)
        blocks, where = [], []
        j = torch.arange(nkb * bk)
        for s in range(num_seqs):
            for h in range(num_heads):
                for qb in range(nqb):
                    p = torch.arange(qb * bq, (qb + 1) * bq)
                    m = torch.as_tensor(mask_mod(torch.tensor(s), torch.tensor(h), p[:, None], j[None, :])).bool()
                    valid = (p < seq_len)[:, None] & (j < seq_len)[None, :]
                    m = m.expand(bq, nkb * bk) & valid
                    tiles = m.reshape(bq, nkb, bk).transpose(0, 1)           # [nkb, bq, bk]
                    some = tiles.any(dim=2).any(dim=1)
                    # elements outside the sequence don't matter: a tile true wherever it is inside is FULL
                    full = (m | ~valid).reshape(bq, nkb, bk).transpose(0, 1).all(dim=2).all(dim=1) & some
                    layout[s, h, qb] = torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY))
                    for kb in torch.nonzero(some & ~full).flatten().tolist():
                        blocks.append(tiles[kb])
                        where.append((s, h, qb, kb))
        if blocks:
            uniq, inverse = torch.unique(torch.stack(blocks).to(torch.uint8), dim=0, return_inverse=True)
            uniq = uniq.bool()
            for (s, h, qb, kb), i in zip(where, inverse.tolist()):
                index[s, h, qb, kb] = i
        else:
            uniq = torch.zeros((0, bq, bk), dtype=torch.bool)
        return cls((bq, bk), layout, index, uniq, seq_len)

    @classmethod
    def local_global(cls, seq_len: int, window: int, global_tokens, block_size=(64, 64)) -> "BlockMask":
        """Longformer/BigBird: |p - j| <= window, plus global tokens that see and are seen by all."""
        tokens = torch.as_tensor(list(global_tokens), dtype=torch.long)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= seq_len):
            raise ValueError(f"global_tokens: positions must lie in [0, {seq_len}), got {tokens.tolist()}")
        glob = torch.zeros(seq_len + max(block_size), dtype=torch.bool)
        glob[tokens] = True
        return cls.from_mask_mod(
            lambda s, h, p, j: ((p - j).abs() <= window) | glob[p.clamp(max=glob.numel() - 1)]
            | glob[j.clamp(max=glob.numel() - 1)], seq_len, block_size)

    @classmethod
    def strided(cls, seq_len: int, stride: int, local: int, block_size=(64, 64)) -> "BlockMask":
        """Sparse Transformer strided pattern: the last `local` keys plus every `stride`-th one back."""
        return cls.from_mask_mod(lambda s, h, p, j: (j <= p) & (((p - j) < local) | ((p - j) % stride == 0)),
                                 seq_len, block_size)

    @classmethod
    def chunked_local(cls, seq_len: int, chunk: int, block_size=(64, 64)) -> "BlockMask":
        """Llama 4 chunked attention: a query sees keys of its own chunk of `chunk` positions."""
        return cls.from_mask_mod(lambda s, h, p, j: (p // chunk) == (j // chunk), seq_len, block_size)

    @classmethod
    def document(cls, doc_ids, block_size=(64, 64)) -> "BlockMask":
        """Several documents packed in one sequence: position p sees j only inside its own document."""
        ids = torch.as_tensor(doc_ids, dtype=torch.long)
        n = ids.numel()
        pad = torch.cat([ids, torch.full((max(block_size) * 2,), -1, dtype=torch.long)])
        return cls.from_mask_mod(lambda s, h, p, j: pad[p] == pad[j], n, block_size)

    @classmethod
    def prefix_lm(cls, seq_len: int, prefix_len: int, block_size=(64, 64)) -> "BlockMask":
        """Prefix-LM: bidirectional over the first `prefix_len` positions, causal after (use causal=False)."""
        return cls.from_mask_mod(lambda s, h, p, j: (j < prefix_len) | (j <= p), seq_len, block_size)

    # ---- use ------------------------------------------------------------------------------------

    def to(self, device) -> "BlockMask":
        return dataclasses.replace(self, layout=self.layout.to(device), partial_index=self.partial_index.to(device),
                                   partial_masks=self.partial_masks.to(device))

    @property
    def device(self):
        return self.layout.device

    def visible(self, s: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """What the mask allows sequence s: bool [Hm, len(q_pos), len(k_pos)], Hm = 1 or the head count
        of the layout (positions outside it see nothing)."""
        bq, bk = self.block_size
        si = s if self.layout.shape[0] > 1 else 0
        lay, index = self.layout[si], self.partial_index[si]                   # [Hm, nqb, nkb]
        nqb, nkb = lay.shape[1:]
        inside = ((q_pos >= 0) & (q_pos < nqb * bq))[:, None] & ((k_pos >= 0) & (k_pos < nkb * bk))[None, :]
        if nqb == 0 or nkb == 0:
            return torch.zeros_like(inside)[None].expand(lay.shape[0], -1, -1)
        # flat index_select gathers: advanced indexing is ~500x slower on the CPU for these sizes
        qb, kb = q_pos.clamp(0, nqb * bq - 1) // bq, k_pos.clamp(0, nkb * bk - 1) // bk
        where = (qb[:, None] * nkb + kb[None, :]).flatten().long()
        state = lay.flatten(1).index_select(1, where).view(lay.shape[0], q_pos.numel(), k_pos.numel())
        allowed = state == FULL
        partial = state == PARTIAL
        if bool(partial.any()):
            pick = index.flatten(1).index_select(1, where).clamp(min=0).long() * (bq * bk)
            elem = ((q_pos % bq)[:, None] * bk + (k_pos % bk)[None, :]).flatten().long()
            inner = self.partial_masks.flatten().index_select(0, (pick + elem).flatten()).view_as(state)
            allowed |= partial & inner
        return allowed & inside

    def dense(self, s: int, h: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Element mask [len(q_pos), len(k_pos)] for sequence s, head h (positions outside see nothing)."""
        vis = self.visible(s, q_pos, k_pos)
        return vis[h if vis.shape[0] > 1 else 0]

    def check_for(self, *, nseq: int, heads: int, max_len: int | None, device) -> None:
        """Raise ValueError unless this mask fits a call with `nseq` sequences, `heads` query heads."""
        s, h, nqb, nkb = self.layout.shape
        if s not in (1, nseq):
            raise ValueError(f"block_mask: layout axis 0 must be 1 or the sequence count {nseq}, got {s}")
        if h not in (1, heads):
            raise ValueError(f"block_mask: layout axis 1 must be 1 or the query head count {heads}, got {h}")
        if self.device != device:
            raise ValueError(f"block_mask: on {self.device}, the inputs are on {device}; use block_mask.to(device)")
        if max_len is not None:
            bq, bk = self.block_size
            need = (math.ceil(max_len / bq), math.ceil(max_len / bk))
            if nqb < need[0] or nkb < need[1]:
                raise ValueError(f"block_mask: layout covers {nqb}x{nkb} blocks of {bq}x{bk}, the longest "
                                 f"sequence ({max_len} keys) needs {need[0]}x{need[1]}")
            if self.seq_len is not None and max_len > self.seq_len:
                raise ValueError(f"block_mask: built for sequences of up to {self.seq_len} positions, the longest "
                                 f"sequence has {max_len} keys")

    def density(self) -> float:
        """Fraction of blocks that are not empty."""
        return float((self.layout != EMPTY).float().mean()) if self.layout.numel() else 0.0
