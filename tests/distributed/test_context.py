"""Context-parallel attention on 2 and 4 gloo ranks equals the single-device `attention` within the conformance
tolerance (ragged batches, windows, sinks, softcap, block masks, GQA), and moves only the keys a window or
mask lets a rank see."""
import math

import numpy as np
import pytest
import torch

import portable_attn as pa
from portable_attn.backends.reference.precision import emulate
from portable_attn.conformance.tolerance import compare
from portable_attn.distributed import ContextLayout, context_attention, plan, received_tokens

from .ranks import run_ranks

LENS = [37, 1, 0, 50, 13]  # shorter than 2 * world chunks, empty, and long sequences
# (name, options, lengths); each runs in float32 and bfloat16 on every rank
SCENARIOS = [
    ("causal_sinks", dict(causal=True, sinks=True), LENS),
    ("window_softcap", dict(causal=True, window_size=(7, 0), softcap=10.0), LENS),
    ("window_sinks_long", dict(causal=True, window_size=(20, 0), sinks=True), [150, 3]),
    ("noncausal", dict(causal=False), LENS),
    ("noncausal_window", dict(causal=False, window_size=(5, 3), sinks=True), LENS),
    ("mask_local_global", dict(causal=True, mask="local_global", sinks=True), [64, 40]),
    ("mask_chunked_window", dict(causal=True, mask="chunked", window_size=(20, 0)), [72, 9, 33]),
]


def _mask(kind, lmax):
    if kind == "local_global":
        return pa.BlockMask.local_global(lmax, 8, [0, 1, 17], (8, 8))
    return pa.BlockMask.chunked_local(lmax, 24, (8, 16))


def _inputs(lens, opts, dtype, hq=4, hkv=2):
    g = torch.Generator().manual_seed(len(lens) * 1000 + sum(lens))
    t = sum(lens)
    q, k, v = (torch.randn(t, h, 16, generator=g).to(dtype) for h in (hq, hkv, hkv))
    a = dict(causal=opts["causal"], window_size=opts.get("window_size", (-1, -1)), softcap=opts.get("softcap", 0.0))
    if opts.get("sinks"):
        a["sinks"] = torch.randn(hq, generator=g)
    if opts.get("mask"):
        a["block_mask"] = _mask(opts["mask"], max(lens))
    return q, k, v, a


def _check(rank, world, name, opts, lens, dtype):
    q, k, v, a = _inputs(lens, opts, dtype)
    cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
    align = math.lcm(*a["block_mask"].block_size) if "block_mask" in a else 1
    layout = ContextLayout(cu, world, align=align)
    o, lse = context_attention(*(layout.shard(x, rank) for x in (q, k, v)), layout, return_lse=True, **a)
    up = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in a.items()}
    ref = lambda x: x.double()  # noqa: E731
    oracle = pa.attention(ref(q), ref(k), ref(v), cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True,
                          backend="reference", **up)
    with emulate(dtype):
        emulated = pa.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, backend="reference", **a)
    rows = layout.rows(rank)
    for what, got, want, low in (("o", o, oracle[0][rows], emulated[0][rows]),
                                 ("lse", lse, oracle[1][:, rows], emulated[1][:, rows])):
        verdict = compare(got, want, low, dtype)
        assert verdict.ok, f"rank {rank}/{world} {name} {dtype} {what}: {verdict.detail or verdict.err} > {verdict.tol}"


def _all_scenarios(rank, world):
    for name, opts, lens in SCENARIOS:
        for dtype in (torch.float32, torch.bfloat16):
            _check(rank, world, name, opts, lens, dtype)


@pytest.mark.parametrize("world", [2, 4])
def test_context_attention_equals_one_device(world):
    run_ranks(_all_scenarios, world, timeout=240)


def _needs_per_rank(world, lens, **kw):
    layout = ContextLayout(torch.tensor(np.cumsum([0] + lens), dtype=torch.int32), world)
    return received_tokens(layout, plan(layout, **kw))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_window_traffic_is_proportional_to_the_window(world):
    """A rank receives at most `left` keys before each of its chunks under a window, whatever the length."""
    for length in (4096, 65536):
        got = _needs_per_rank(world, [length], causal=True, window_size=(16, 0))
        assert max(got) <= 2 * 16, (length, got)
    full = _needs_per_rank(world, [4096], causal=True)
    assert max(full) >= 4096 // 2  # without a window the late chunk's rank needs most of the sequence


def test_mask_traffic_skips_empty_blocks():
    """Under a chunked-local mask a rank receives keys of its own 64-position chunks only."""
    layout = ContextLayout(torch.tensor([0, 1024], dtype=torch.int32), 4, align=64)
    mask = pa.BlockMask.chunked_local(1024, 64, (64, 64))
    got = received_tokens(layout, plan(layout, causal=True, block_mask=mask))
    assert got == [0, 0, 0, 0], got   # 128-token chunks hold whole 64-position mask chunks
    dense = received_tokens(layout, plan(layout, causal=True))
    assert min(dense) > 0


def test_layout_shards_and_unshards():
    layout = ContextLayout([0, 37, 38, 38, 88], 4, align=4)
    x = torch.arange(88)
    parts = [layout.shard(x, r) for r in range(4)]
    assert sum(len(p) for p in parts) == 88
    assert torch.equal(layout.unshard(parts), x)
    for chunks in layout.chunks:  # boundaries aligned except at a sequence's end
        for c in chunks:
            length = layout.cu_seqlens[c.seq + 1] - layout.cu_seqlens[c.seq]
            assert c.start % 4 == 0 and (c.end % 4 == 0 or c.end == length)
