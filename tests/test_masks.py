"""BlockMask: constructors are exact, blocks are classified right, bad layouts and mismatched calls are refused."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from portable_attn import checks
from portable_attn.masks import EMPTY, FULL, PARTIAL, BlockMask

BLOCKS = [(1, 1), (4, 4), (16, 24), (7, 3), (64, 64)]
GLOBAL = (0, 5, 33)
DOCS = [0] * 9 + [1] * 3 + [2] * 14 + [3] + [4] * 10  # 37 positions


def elementwise(pred, n: int, s: int = 0, h: int = 0) -> torch.Tensor:
    """The predicate evaluated position by position on Python ints: bool [n, n]."""
    return torch.tensor([[bool(pred(s, h, p, j)) for j in range(n)] for p in range(n)], dtype=torch.bool).reshape(n, n)


# (constructor from (n, block_size), the element predicate it must equal, on Python ints)
CONSTRUCTORS = {
    "mask_mod": (lambda n, bs: BlockMask.from_mask_mod(lambda s, h, p, j: ((p * 5 + j) % 7 < 3) | (j == p), n, bs),
                 lambda s, h, p, j: (p * 5 + j) % 7 < 3 or j == p),
    "local_global": (lambda n, bs: BlockMask.local_global(n, 3, [g for g in GLOBAL if g < n], bs),
                     lambda s, h, p, j: abs(p - j) <= 3 or p in GLOBAL or j in GLOBAL),
    "strided": (lambda n, bs: BlockMask.strided(n, 5, 2, bs),
                lambda s, h, p, j: j <= p and (p - j < 2 or (p - j) % 5 == 0)),
    "chunked_local": (lambda n, bs: BlockMask.chunked_local(n, 8, bs),
                      lambda s, h, p, j: p // 8 == j // 8),
    "document": (lambda n, bs: BlockMask.document(DOCS[:n], bs),
                 lambda s, h, p, j: DOCS[p] == DOCS[j]),
    "prefix_lm": (lambda n, bs: BlockMask.prefix_lm(n, 11, bs),
                  lambda s, h, p, j: j < 11 or j <= p),
}


def classify_ok(bm: BlockMask, pred, n: int, s: int = 0, h: int = 0) -> None:
    """Every block is FULL / EMPTY / PARTIAL exactly as the predicate inside the sequence says."""
    bq, bk = bm.block_size
    lay = bm.layout[s if bm.layout.shape[0] > 1 else 0, h if bm.layout.shape[1] > 1 else 0]
    idx = bm.partial_index[s if bm.layout.shape[0] > 1 else 0, h if bm.layout.shape[1] > 1 else 0]
    want = elementwise(pred, n, s, h)
    assert lay.shape == (math.ceil(n / bq), math.ceil(n / bk))
    for qb in range(lay.shape[0]):
        for kb in range(lay.shape[1]):
            tile = want[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]  # the part inside the sequence
            expect = FULL if tile.all() else EMPTY if not tile.any() else PARTIAL
            assert int(lay[qb, kb]) == expect, (qb, kb)
            if expect == PARTIAL:
                stored = bm.partial_masks[int(idx[qb, kb])][:tile.shape[0], :tile.shape[1]]
                assert torch.equal(stored, tile)
            else:
                assert int(idx[qb, kb]) == -1


@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("n", [37, 24, 1])
@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
def test_constructor_is_exact(kind, n, bs):
    make, pred = CONSTRUCTORS[kind]
    bm = make(n, bs)
    assert bm.layout.dtype == torch.int8 and bm.partial_index.dtype == torch.int32
    assert bm.partial_masks.dtype == torch.bool and bm.partial_masks.shape[1:] == bs
    pos = torch.arange(n)
    assert torch.equal(bm.dense(0, 0, pos, pos), elementwise(pred, n))
    classify_ok(bm, pred, n)
    # partial tiles are deduplicated
    pm = bm.partial_masks.flatten(1)
    assert torch.unique(pm, dim=0).shape[0] == pm.shape[0]


def test_positions_outside_the_layout_see_nothing():
    bm = BlockMask.from_layout(torch.ones(3, 2, dtype=torch.bool), (4, 5))  # covers q 0..11, k 0..9
    got = bm.dense(0, 0, torch.tensor([-3, -1, 0, 11, 12, 20]), torch.tensor([-1, 0, 9, 10, 14]))
    want = torch.zeros(6, 5, dtype=torch.bool)
    want[2:4, 1:3] = True
    assert torch.equal(got, want)


def test_empty_layout_and_empty_positions():
    bm = BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 0, (4, 4))
    assert bm.layout.shape == (1, 1, 0, 0)
    assert bm.dense(0, 0, torch.arange(3), torch.arange(0)).shape == (3, 0)
    assert not bm.dense(0, 0, torch.arange(3), torch.arange(2)).any()
    full = BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), (4, 4))
    assert full.dense(0, 0, torch.arange(0), torch.arange(5)).shape == (0, 5)


def test_causal_tiles_deduplicate_to_one():
    bm = BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 12, (4, 4), num_seqs=3, num_heads=2)
    assert bm.partial_masks.shape[0] == 1
    assert torch.equal(bm.partial_masks[0], torch.ones(4, 4, dtype=torch.bool).tril())
    want = torch.tensor([[1, 0, 0], [2, 1, 0], [2, 2, 1]], dtype=torch.int8)
    assert torch.equal(bm.layout, want.expand(3, 2, 3, 3))
    # a ragged last block adds at most one more distinct tile
    assert BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 10, (4, 4)).partial_masks.shape[0] <= 2


def test_per_sequence_and_per_head_mask_mod():
    def pred(s, h, p, j):
        return (p - j) % (2 + s + h) == 0
    bm = BlockMask.from_mask_mod(pred, 19, (4, 6), num_seqs=3, num_heads=2)
    assert bm.layout.shape == (3, 2, 5, 4)
    pos = torch.arange(19)
    for s in range(3):
        for h in range(2):
            assert torch.equal(bm.dense(s, h, pos, pos), elementwise(pred, 19, s, h))
            classify_ok(bm, pred, 19, s, h)


def test_mask_mod_may_return_integers():
    bm = BlockMask.from_mask_mod(lambda s, h, p, j: (p + j) % 3, 10, (4, 4))
    pos = torch.arange(10)
    assert torch.equal(bm.dense(0, 0, pos, pos), elementwise(lambda s, h, p, j: (p + j) % 3 != 0, 10))


def test_full_and_empty_blocks_need_no_partial_masks():
    full = BlockMask.from_mask_mod(lambda s, h, p, j: p >= 0, 21, (8, 8))
    assert (full.layout == FULL).all() and full.partial_masks.shape[0] == 0  # ragged tail still FULL
    none = BlockMask.from_mask_mod(lambda s, h, p, j: p < 0, 21, (8, 8))
    assert (none.layout == EMPTY).all() and none.density() == 0.0
    assert full.density() == 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), bq=st.integers(1, 24), bk=st.integers(1, 24), lo=st.integers(-10, 10),
       width=st.integers(0, 12), stride=st.integers(1, 9), heads=st.sampled_from([1, 2]))
def test_property_mask_mod_exact(n, bq, bk, lo, width, stride, heads):
    def pred(s, h, p, j):
        return ((p - j >= lo + h) & (p - j <= lo + h + width)) | ((p + 2 * j) % stride == 0)
    bm = BlockMask.from_mask_mod(pred, n, (bq, bk), num_heads=heads)
    pos = torch.arange(n)
    for h in range(heads):
        assert torch.equal(bm.dense(0, h, pos, pos), elementwise(pred, n, 0, h))
        classify_ok(bm, pred, n, 0, h)


# ---- from_layout ------------------------------------------------------------------------------

def test_from_layout_accepts_bool_and_2d_layouts_with_partials():
    lay = torch.tensor([[2, 1], [0, 1]])
    index = torch.tensor([[-1, 0], [-1, 1]])
    tiles = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    bm = BlockMask.from_layout(lay, (2, 2), index, tiles)
    assert bm.layout.shape == (1, 1, 2, 2) and bm.layout.dtype == torch.int8
    want = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(bm.dense(0, 0, torch.arange(4), torch.arange(4)), want)
    b = BlockMask.from_layout(torch.tensor([[True, False]]), (3, 3))
    assert torch.equal(b.layout, torch.tensor([[[[FULL, EMPTY]]]], dtype=torch.int8))


def _ok_parts():
    lay = torch.tensor([[[[2, 1], [0, 1]]]], dtype=torch.int8)
    index = torch.tensor([[[[-1, 0], [-1, 1]]]], dtype=torch.int32)
    tiles = torch.zeros(2, 2, 2, dtype=torch.bool)
    return lay, index, tiles


@pytest.mark.parametrize("case,match", [
    ("float layout", "layout"),
    ("rank 3", "layout"),
    ("rank 1", "layout"),
    ("rank 5", "layout"),
    ("entry 3", "layout"),
    ("entry -1", "layout"),
    ("entry 258", "layout"),  # would wrap to 2 in int8
    ("partial without index or masks", "partial"),
    ("index without masks", "partial"),
    ("masks without index", "partial"),
    ("index -1 where partial", "partial_index"),
    ("index where not partial", "partial_index"),
    ("index -5 where not partial", "partial_index"),
    ("index beyond masks", "partial_index"),
    ("index of another shape", "partial_index"),
    ("masks of another block size", "partial_masks"),
    ("float masks", "partial_masks"),
    ("block size 0", "block_size"),
])
def test_from_layout_rejects(case, match):
    lay, index, tiles = _ok_parts()
    bs = (2, 2)
    BlockMask.from_layout(lay, bs, index, tiles)  # the unmodified parts are fine
    if case == "float layout":
        lay = lay.float()
    elif case == "rank 3":
        lay, index = lay[0], index[0]
    elif case == "rank 1":
        lay = torch.tensor([2, 0], dtype=torch.int8)
        index = tiles = None
    elif case == "rank 5":
        lay, index = lay[None], index[None]
    elif case == "entry 3":
        lay = torch.where(lay == 2, 3, lay).to(torch.int8)
    elif case == "entry -1":
        lay = torch.where(lay == 0, -1, lay).to(torch.int8)
    elif case == "entry 258":
        lay = torch.where(lay == 2, 258, lay.long())
    elif case == "partial without index or masks":
        index = tiles = None
    elif case == "index without masks":
        tiles = None
    elif case == "masks without index":
        index = None
    elif case == "index -1 where partial":
        index = index.clone()
        index[0, 0, 0, 1] = -1
    elif case == "index where not partial":
        index = index.clone()
        index[0, 0, 0, 0] = 0
    elif case == "index -5 where not partial":
        index = index.clone()
        index[0, 0, 1, 0] = -5
    elif case == "index beyond masks":
        index = index.clone()
        index[0, 0, 1, 1] = 2
    elif case == "index of another shape":
        lay = torch.tensor([[[[2, 1, 0]]]], dtype=torch.int8)
        index = torch.tensor([[[[-1], [0], [-1]]]], dtype=torch.int32)  # same count, other shape
    elif case == "masks of another block size":
        tiles = torch.zeros(2, 2, 3, dtype=torch.bool)
    elif case == "float masks":
        tiles = tiles.float()
    elif case == "block size 0":
        bs = (0, 2)
    with pytest.raises(ValueError, match=match):
        BlockMask.from_layout(lay, bs, index, tiles)


# ---- check_for --------------------------------------------------------------------------------

def test_check_for_sequence_and_head_axes():
    bm = BlockMask.from_layout(torch.full((2, 4, 3, 3), FULL, dtype=torch.int8), (4, 4))
    cpu = torch.device("cpu")
    bm.check_for(nseq=2, heads=4, max_len=12, device=cpu)
    with pytest.raises(ValueError, match="axis 0.*3"):
        bm.check_for(nseq=3, heads=4, max_len=12, device=cpu)
    with pytest.raises(ValueError, match="axis 1.*8"):
        bm.check_for(nseq=2, heads=8, max_len=12, device=cpu)
    shared = BlockMask.from_layout(torch.full((1, 1, 3, 3), FULL, dtype=torch.int8), (4, 4))
    shared.check_for(nseq=5, heads=8, max_len=None, device=cpu)  # size-1 axes broadcast


def test_check_for_layout_too_small():
    bm = BlockMask.from_layout(torch.ones(3, 2, dtype=torch.bool), (4, 5))  # q up to 12, k up to 10
    cpu = torch.device("cpu")
    bm.check_for(nseq=1, heads=1, max_len=10, device=cpu)
    bm.check_for(nseq=1, heads=1, max_len=None, device=cpu)
    with pytest.raises(ValueError, match="longest"):
        bm.check_for(nseq=1, heads=1, max_len=11, device=cpu)


def test_attention_checks_refuse_a_mismatched_mask():
    q, k = torch.randn(9, 4, 8), torch.randn(14, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 14], dtype=torch.int32)

    def args(bm):
        return dict(q=q, k=k, v=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=None, max_seqlen_k=None,
                    causal=True, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None,
                    block_mask=bm, return_lse=False, out=None)
    checks.check_attention(args(BlockMask.chunked_local(9, 4, (4, 4))))  # 9 keys fit the layout
    with pytest.raises(ValueError, match="longest"):
        checks.check_attention(args(BlockMask.chunked_local(8, 4, (4, 4))))
    with pytest.raises(ValueError, match="axis 1"):
        checks.check_attention(args(BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 9, (4, 4), num_heads=2)))
    with pytest.raises(ValueError, match="axis 0"):
        checks.check_attention(args(BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 9, (4, 4), num_seqs=3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_check_for_wrong_device():
    bm = BlockMask.chunked_local(8, 4, (4, 4))
    with pytest.raises(ValueError, match="device|block_mask.to"):
        bm.check_for(nseq=1, heads=1, max_len=8, device=torch.device("cuda"))
    bm.to("cuda").check_for(nseq=1, heads=1, max_len=8, device=torch.device("cuda", torch.cuda.current_device()))


def test_local_global_rejects_tokens_outside_the_sequence():
    with pytest.raises(ValueError, match="global_tokens"):
        BlockMask.local_global(10, 2, [3, 10])
    with pytest.raises(ValueError, match="global_tokens"):
        BlockMask.local_global(10, 2, [-1])


def test_to_keeps_the_mask():
    bm = BlockMask.strided(20, 3, 2, (4, 4))
    moved = bm.to("cpu")
    pos = torch.arange(20)
    assert torch.equal(moved.dense(0, 0, pos, pos), bm.dense(0, 0, pos, pos)) and moved.device == bm.device
