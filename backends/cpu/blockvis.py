"""Block-mask visibility of one attention tile gathered block by block: a tile of whole block rows
over whole key blocks takes each block's element mask from a table (none, all, or one of the mask's
PARTIAL masks) instead of looking every (query, key) pair up; a tile whose blocks are all FULL needs no
mask at all."""
from __future__ import annotations

import torch

from portable_attn.masks import FULL, PARTIAL


def table(bm) -> torch.Tensor:
    """bool [2 + M, bq, bk]: an EMPTY block, a FULL block, then the mask's M PARTIAL masks."""
    bq, bk = bm.block_size
    return torch.cat([torch.zeros(1, bq, bk, dtype=torch.bool), torch.ones(1, bq, bk, dtype=torch.bool),
                      bm.partial_masks.cpu()])


def visible(bm, tab, s: int, p0: int, p1: int, j):
    """What `bm` lets query positions p0 .. p1 - 1 of sequence s see of keys j (ascending positions):
    bool [Hm, p1 - p0, len(j)], or None when they see every one of them."""
    bq, bk = bm.block_size
    si = s if bm.layout.shape[0] > 1 else 0
    lay = bm.layout[si]  # [Hm, nqb, nkb]
    n = j.numel()
    blockwise = (n % bk == 0 and p0 >= 0 and p1 <= lay.shape[1] * bq and
                 bool((j.view(-1, bk) == j.view(-1, bk)[:, :1] + torch.arange(bk)).all()) and
                 bool((j[::bk] % bk == 0).all()))
    if not blockwise:  # keys cut inside a block, or rows past the layout: pair by pair
        return bm.visible(s, torch.arange(p0, p1), j)
    qb0, qb1 = p0 // bq, -(-p1 // bq)
    kb = j[::bk] // bk
    state = lay[:, qb0:qb1].index_select(2, kb)  # [Hm, nq, nk]
    if bool((state == FULL).all()):
        return None
    code = torch.where(state == PARTIAL, 2 + bm.partial_index[si][:, qb0:qb1].index_select(2, kb).long(),
                       (state == FULL).long())
    hm, nq, nk = code.shape
    blocks = tab.index_select(0, code.flatten()).view(hm, nq, nk, bq, bk)
    rows = blocks.permute(0, 1, 3, 2, 4).reshape(hm, nq * bq, n)
    return rows[:, p0 - qb0 * bq:p1 - qb0 * bq]
