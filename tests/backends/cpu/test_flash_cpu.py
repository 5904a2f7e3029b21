"""The cpu backend's compiled prefill attention (flash.cpp): causal/window bands, GQA, head dims on and off the vector
width, Dv != D, chunked prefill, varlen with empty and one-token sequences, softcap, sinks and lse, block masks of
every block size and kind of block, against the float64 reference; strided views with NaN around them, a NaN-filled
out=, nothing else written, NaN keys no query sees never let in. (Its conformance cases with
and without the kernels: test_native_cpu.py.)"""
import math

import pytest
import torch

import portable_attn as pa
from portable_attn.backends.cpu import workspace
from portable_attn.conformance.invisible import invisible
from portable_attn.masks import BlockMask
from tests.backends.cpu.test_native_cpu import spy_on
from tests.backends.cpu.test_recurrent_kernels_cpu import bits, in_nan, nan_around, tol

# name: (query and key counts per sequence, causal, window, (Hq, Hkv), D, Dv, sinks)
CASES = {
    "causal": ([150], [150], True, (-1, -1), (4, 2), 64, 64, False),
    "dense": ([130], [130], False, (-1, -1), (4, 4), 16, 16, True),
    "left": ([200], [200], True, (37, -1), (6, 2), 80, 48, False),
    "left_only": ([150], [150], False, (20, -1), (2, 1), 128, 128, True),
    "right_only": ([140], [140], False, (-1, 9), (4, 2), 64, 80, False),
    "both": ([160], [160], False, (25, 17), (4, 2), 256, 64, False),
    "wider_than_sequence": ([90], [90], True, (500, 500), (4, 2), 64, 64, True),
    "chunked_prefill": ([70], [230], True, (100, -1), (4, 2), 64, 64, False),
    "unseen_queries": ([120], [40], True, (-1, -1), (4, 2), 16, 16, True),  # the first 80 see no key
    "varlen": ([0, 1, 40, 90, 17, 5], [0, 1, 60, 90, 5, 0], True, (30, -1), (4, 2), 64, 32, True),
    "varlen_dense": ([33, 0, 1], [20, 5, 1], False, (-1, -1), (2, 2), 256, 256, False),
    "odd_head_dims": ([50], [50], True, (-1, -1), (3, 1), 17, 9, False),
}


SOFTCAP = {"left": 20.0, "dense": 5.0, "varlen": 30.0}  # cases whose scores are capped


# name: (the case of CASES it masks, block size, layout per sequence, per head): random EMPTY / PARTIAL / FULL
# blocks, partial masks of random elements; block sizes under, at and over the kernel's 64, and off its multiples
MASKED = {
    "causal_64": ("causal", (64, 64), False, False),
    "dense_16x32": ("dense", (16, 32), False, True),
    "left_48x80": ("left", (48, 80), False, False),
    "both_128": ("both", (128, 128), False, True),
    "chunked_prefill_7x100": ("chunked_prefill", (7, 100), False, False),
    "unseen_queries_32x16": ("unseen_queries", (32, 16), False, False),
    "varlen_24x40": ("varlen", (24, 40), True, True),
    "varlen_dense_64x1": ("varlen_dense", (64, 1), True, False),
}


def _mask(name, gen, weights=(0.3, 0.4, 0.3)):
    case, (bq, bk), per_seq, per_head = MASKED[name]
    lq, lk, _, _, (hq, _), *_ = CASES[case]
    longest = max(lk)
    shape = (len(lk) if per_seq else 1, hq if per_head else 1, -(-longest // bq), -(-longest // bk))
    layout = torch.multinomial(torch.tensor(weights), math.prod(shape), True, generator=gen).view(shape)
    partial = layout == 1
    index = torch.where(partial, torch.cumsum(partial.flatten(), 0).view(shape) - 1, -1).to(torch.int32)
    masks = torch.rand(int(partial.sum()), bq, bk, generator=gen) < 0.5
    return BlockMask.from_layout(layout, (bq, bk), index, masks)


def _call(name, dtype, gen, weights=(0.3, 0.4, 0.3)):
    """The inputs of a case; a MASKED one's blocks EMPTY, PARTIAL, FULL by `weights`."""
    if name in MASKED:
        (q, k, v), kw = _call(MASKED[name][0], dtype, gen)
        return (q, k, v), kw | dict(block_mask=_mask(name, gen, weights))
    lq, lk, causal, window, (hq, hkv), d, dv, sinks = CASES[name]
    q = torch.randn(sum(lq), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(lk), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(lk), hkv, dv, generator=gen).to(dtype)
    kw = dict(causal=causal, window_size=window, softmax_scale=0.7 / math.sqrt(d), return_lse=True,
              sinks=torch.randn(hq, generator=gen) if sinks else None, softcap=SOFTCAP.get(name, 0.0))
    if len(lq) > 1:
        kw.update({f"cu_seqlens_{n}": torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
                   for n, lens in (("q", lq), ("k", lk))})
    return (q, k, v), kw


@pytest.mark.parametrize("name", [*CASES, *MASKED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("every_other", [False, True])
def test_matches_reference(monkeypatch, name, dtype, every_other):
    """q, k, v between NaN rows and heads (with `every_other`, also every other element: copied before the kernel), a
    NaN-filled out= view: one kernel call, out and lse as the reference's, every byte around the views unchanged."""
    _check(monkeypatch, name, dtype, every_other)


@pytest.mark.parametrize("keep", [1, 20_000])
@pytest.mark.parametrize("name", ["left", "varlen"])
def test_kv_head_groups(monkeypatch, keep, name):
    """Packed keys and values over workspace.KEEP_BYTES: kv heads packed and run a group at a time (one head each in a
    fresh buffer; or a few)."""
    monkeypatch.setattr(workspace, "KEEP_BYTES", keep)
    _check(monkeypatch, name, torch.bfloat16, False)


def _check(monkeypatch, name, dtype, every_other):
    calls = spy_on(monkeypatch, "flash")
    (q, k, v), kw = _call(name, dtype, torch.Generator().manual_seed(len(name) + 7 * every_other))
    views, bufs = zip(*(in_nan(x, every_other) for x in (q, k, v)))
    out, ob = in_nan(torch.full((q.shape[0], q.shape[1], v.shape[2]), math.nan, dtype=dtype), every_other)
    before = [b.clone() for b in bufs]
    o, lse = pa.attention(*views, **kw, out=out, backend="cpu")
    assert o is out and len(calls) == 1
    ro, rlse = pa.attention(q.double(), k.double(), v.double(), **kw, backend="reference")
    torch.testing.assert_close(o.double(), ro, **tol(dtype))
    torch.testing.assert_close(lse.double(), rlse.double(), **tol(dtype))
    assert all(torch.equal(bits(b), bits(was)) for b, was in zip(bufs, before))  # inputs untouched, NaN included
    assert nan_around(ob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_only_visible_keys(monkeypatch, dtype):
    """Chunked prefill with a window: the keys no query sees (before the first one's window) NaN, the output as
    without them, bit for bit; lse not asked for."""
    calls = spy_on(monkeypatch, "flash")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(100, 4, 64, generator=gen).to(dtype)
    k, v = (torch.randn(400, 2, 64, generator=gen).to(dtype) for _ in range(2))
    kw = dict(causal=True, window_size=(50, 0), backend="cpu")
    expected = pa.attention(q, k, v, **kw)
    k[:249], v[:249] = math.nan, math.nan  # query 0 sits at 300 and sees 250 ..
    got = pa.attention(q, k, v, **kw)
    assert len(calls) == 2 and torch.isfinite(got).all()
    assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("name", list(MASKED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mask_never_lets_unseen_keys_in(monkeypatch, name, dtype):
    """Keys and values no query of the call sees (by band and block mask) NaN: the output and lse as without them, bit
    for bit (scores of hidden keys are dropped, never multiplied by zero)."""
    calls = spy_on(monkeypatch, "flash")
    (q, k, v), kw = _call(name, dtype, torch.Generator().manual_seed(len(name)), weights=(0.8, 0.15, 0.05))
    hidden = invisible("attention", dict(q=q, k=k, v=v, **kw))
    assert any(m.any() for m in hidden.values())
    expected = pa.attention(q, k, v, **kw, backend="cpu")
    got = pa.attention(q, k.masked_fill(hidden["k"], math.nan), v.masked_fill(hidden["v"], math.nan), **kw,
                       backend="cpu")
    assert len(calls) == 2
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, expected))
