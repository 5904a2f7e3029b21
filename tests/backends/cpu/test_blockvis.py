"""The cpu backend's block-by-block tile visibility against BlockMask.visible, pair by pair."""
import pytest
import torch

from portable_attn.backends.cpu import blockvis
from portable_attn.masks import BlockMask


def _random_mask(gen, bq, bk, nqb, nkb, heads):
    layout = torch.randint(0, 3, (1, heads, nqb, nkb), generator=gen)
    partial = layout == 1
    masks = torch.rand(5, bq, bk, generator=gen) < 0.5
    index = torch.where(partial, torch.randint(0, 5, layout.shape, generator=gen), -1).int()
    return BlockMask.from_layout(layout, (bq, bk), index, masks)


@pytest.mark.parametrize("bq, bk", [(16, 16), (8, 32), (32, 8)])
def test_tile_visibility_matches_the_pairwise_lookup(bq, bk):
    gen = torch.Generator().manual_seed(bq * 100 + bk)
    bm = _random_mask(gen, bq, bk, 6, 7, heads=2)
    tab = blockvis.table(bm)
    for p0, p1 in [(0, bq), (bq, 3 * bq), (bq + 3, 2 * bq), (5 * bq, 6 * bq + 4), (-2, bq)]:
        whole = torch.arange(7 * bk)
        picks = [whole, whole[2 * bk:5 * bk], torch.cat([whole[:bk], whole[4 * bk:6 * bk]]), whole[3:3 * bk]]
        for j in picks:
            got = blockvis.visible(bm, tab, 0, p0, p1, j)
            want = bm.visible(0, torch.arange(p0, p1), j)
            got = torch.ones_like(want) if got is None else got
            assert torch.equal(got.expand_as(want), want), (p0, p1, j[:3])


def test_a_tile_of_full_blocks_needs_no_mask():
    bm = BlockMask.from_layout(torch.full((3, 3), 2), (4, 4))
    assert blockvis.visible(bm, blockvis.table(bm), 0, 4, 8, torch.arange(12)) is None
