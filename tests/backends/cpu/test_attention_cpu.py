"""The cpu attention ops beyond the conformance suite: work follows the visible pattern (never T x T),
strided inputs and cache views, long windowed sequences, low precision, batched decode, `out=`.
Every result is compared with the float64 reference (`backend="reference"`) on random inputs."""
from __future__ import annotations

import math

import pytest
import torch

import portable_attn as pa
from portable_attn.backends.cpu import attention as cpu_attention
from portable_attn.backends.cpu import paged as cpu_paged
from portable_attn.backends.cpu import sparse as cpu_sparse
from portable_attn.backends.cpu import tiles
from portable_attn.masks import BlockMask
from tests.backends.compare import against_reference, assert_close


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def both(op, *args, **kw):
    return against_reference("cpu", op, *args, **kw)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record (q shape, k shape) of every kernel call (fused and explicit) the cpu ops make."""
    calls = []

    def spy(name):
        real = getattr(tiles, name)

        def wrapped(q, k, *rest, **kw):
            calls.append((tuple(q.shape), tuple(k.shape)))
            return real(q, k, *rest, **kw)
        for module in (tiles, cpu_attention, cpu_paged):  # the decode paths call the kernel directly
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, wrapped)

    spy("flash")
    spy("_explicit")
    return calls


def pairs(calls):
    """Scores computed, all query heads together: B * heads * rows * keys summed over the calls."""
    return sum(q[0] * q[1] * q[2] * k[2] for q, k in calls)


# ---- work follows the pattern ---------------------------------------------------------------

@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_window_work_is_linear(kernel_calls, softcap, monkeypatch):
    """A window of W computes O(T * (W + tile)) pairs, each call O(tile * (W + tile)) of them (the torch path; the
    compiled kernel's band: test_flash_cpu.py)."""
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    t, w, hq, hkv = 2048, 64, 4, 2
    g = gen(1)
    q, k, v = rand(t, hq, 16, gen=g), rand(t, hkv, 16, gen=g), rand(t, hkv, 16, gen=g)
    pa.attention(q, k, v, causal=True, window_size=(w - 1, 0), softcap=softcap, backend="cpu")
    tile = cpu_attention.MIN_TILE  # tiles about as wide as the window
    assert pairs(kernel_calls) <= hq * t * (w + tile)
    assert pairs(kernel_calls) < hq * t * t / 8
    assert max(q[2] * k[2] for q, k in kernel_calls) <= (hq // hkv) * tile * (w + tile)
    assert all(q[1] == k[1] for q, k in kernel_calls)  # GQA packed: a kv head's query heads share a call row


def test_block_mask_work_is_the_visible_blocks(kernel_calls, monkeypatch):
    """With a block-sparse mask only the key blocks non-EMPTY for a query tile are computed (the torch path; the
    compiled kernel skips EMPTY blocks per 64 x 64 block, test_flash_cpu.py)."""
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    t, blk = 2048, 64
    nb = t // blk
    layout = torch.zeros(nb, nb, dtype=torch.int8)
    layout[torch.arange(nb), torch.arange(nb)] = 2                 # diagonal blocks
    layout[torch.arange(nb), (torch.arange(nb) * 5 + 3) % nb] = 2  # one scattered block per row
    layout[:, 0] = 2                                               # a global first block
    bm = BlockMask.from_layout(layout, (blk, blk))
    g = gen(2)
    q, k, v = rand(t, 2, 32, gen=g), rand(t, 2, 32, gen=g), rand(t, 2, 32, gen=g)
    mine, ref = both("attention", q, k, v, block_mask=bm)
    assert_close(mine, ref)
    visible_blocks = int((layout != 0).sum())
    assert pairs(kernel_calls) <= 2 * visible_blocks * blk * blk  # 2 heads
    assert pairs(kernel_calls) < 2 * t * t / 8


def test_dense_causal_uses_one_kernel_call(kernel_calls, monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")  # the torch path (else flash.cpp)
    g = gen(3)
    q, k, v = rand(300, 4, 32, gen=g), rand(300, 2, 32, gen=g), rand(300, 2, 32, gen=g)
    pa.attention(q, k, v, causal=True, backend="cpu")
    assert kernel_calls == [((1, 4, 300, 32), (1, 2, 300, 32))]


def test_paged_window_gathers_only_window_blocks(monkeypatch):
    """Decode with a window of 10 over 500 keys in blocks of 8 reads 2-3 blocks, not 63 (the torch path;
    test_native_cpu.py proves the compiled kernel's window)."""
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    gathered = []
    real = tiles.attend
    monkeypatch.setattr(cpu_paged, "attend", lambda q, k, *a: gathered.append(k.shape[2]) or real(q, k, *a))
    g = gen(4)
    kc, vc = rand(70, 8, 2, 16, gen=g), rand(70, 8, 2, 16, gen=g)
    table = torch.randperm(70, generator=g)[:63].to(torch.int32)[None]
    q = rand(1, 4, 16, gen=g)
    seqused = torch.tensor([500], dtype=torch.int32)
    assert_close(*both("paged_attention", q, kc, vc, table, seqused, window_size=(9, 0)))
    assert gathered == [16]


# ---- layouts and strides ------------------------------------------------------------------

def test_strided_inputs():
    """q, k, v as views of one packed qkv buffer, with a non-unit stride on the head dim too."""
    g = gen(5)
    qkv = rand(150, 3, 4, 64, gen=g)
    q, k, v = qkv[:, 0, :, ::2], qkv[:, 1, :2, 1::2], qkv[:, 2, 2:, :32]
    cu = torch.tensor([0, 40, 150], dtype=torch.int32)
    for kw in ({"causal": True}, {"causal": True, "window_size": (20, 0)}, {"softcap": 3.0}):
        assert_close(*both("attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw))


def test_write_kv_cache_into_views_then_paged():
    """k_cache / v_cache as views kv[:, 0], kv[:, 1] of one buffer: written in place, other slots kept."""
    g = gen(6)
    nb, bs, hkv, d = 12, 5, 2, 16
    kv = rand(nb, 2, bs, hkv, d, gen=g)
    before = kv.clone()
    lens = [17, 23]
    slots = torch.randperm(nb * bs, generator=g)[:sum(lens)]
    mapping = torch.cat([slots, torch.tensor([-1, -1])]).to(torch.int64)
    k, v = rand(sum(lens) + 2, hkv, d, gen=g), rand(sum(lens) + 2, hkv, d, gen=g)
    pa.write_kv_cache(k, v, kv[:, 0], kv[:, 1], mapping, backend="cpu")
    flat = kv.transpose(0, 1).reshape(2, nb * bs, hkv, d)
    assert torch.equal(flat[0, slots], k[:-2]) and torch.equal(flat[1, slots], v[:-2])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], before.transpose(0, 1).reshape(2, nb * bs, hkv, d)[:, untouched])
    # rewrite each sequence's tokens, in order, through a block table of disjoint shuffled blocks
    table = torch.zeros(2, 8, dtype=torch.int32)
    free, ordered = torch.randperm(nb, generator=g), []
    for i, n in enumerate(lens):
        blocks, free = free[:-(-n // bs)], free[-(-n // bs):]
        table[i, :blocks.numel()] = blocks.to(torch.int32)
        ordered.append(torch.stack([blocks[j // bs] * bs + j % bs for j in range(n)]))
    pa.write_kv_cache(k[:-2], v[:-2], kv[:, 0], kv[:, 1], torch.cat(ordered), backend="cpu")
    q = rand(8, 4, d, gen=g)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    seqused = torch.tensor(lens, dtype=torch.int32)
    mine = pa.paged_attention(q, kv[:, 0], kv[:, 1], table, seqused, cu_seqlens_q=cu_q, backend="cpu")
    cu_k = torch.tensor([0, 17, 40], dtype=torch.int32)
    ref = pa.attention(q.double(), k[:-2].double(), v[:-2].double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                       causal=True, backend="reference")
    assert float((mine.double() - ref).abs().max()) < 2e-5 * max(1.0, float(ref.abs().max()))


# ---- long sequences and low precision -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_long_window(dtype):
    g = gen(7)
    t = 2000
    q, k, v = (rand(t, h, 64, dtype=dtype, gen=g) for h in (4, 2, 2))
    sinks = rand(4, gen=g)
    assert_close(*both("attention", q, k, v, causal=True, window_size=(63, 0), sinks=sinks), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_varlen_mask_softcap(dtype):
    g = gen(8)
    lens = [130, 0, 257, 5]
    cu = torch.tensor([0, 130, 130, 387, 392], dtype=torch.int32)
    q, k, v = (rand(sum(lens), h, 32, dtype=dtype, gen=g) for h in (6, 2, 2))
    bm = BlockMask.strided(257, 9, 20, (32, 16))
    assert_close(*both("attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, block_mask=bm), dtype)
    assert_close(*both("attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, softcap=10.0,
                       window_size=(40, 7)), dtype)


@pytest.mark.parametrize("budget", [300, 5_000, 60_000])  # key chunks merged; head steps; batch steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_steps(monkeypatch, budget, dtype):
    """The explicit (softcap) path cut into steps of rows and key chunks, merged by lse, rows that see
    nothing in a chunk included; dense, windowed and GQA calls (prefill-sized: FEW_QUERIES raised to keep them off
    flash.cpp, which caps scores itself)."""
    monkeypatch.setattr(tiles, "SCORE_BUDGET", budget)
    monkeypatch.setattr(cpu_attention, "FEW_QUERIES", 1 << 30)
    g = gen(13)
    q, k, v = (rand(150, h, 16, dtype=dtype, gen=g) for h in (6, 2, 2))
    for kw in ({"causal": True}, {"causal": True, "window_size": (20, 0)}, {"window_size": (5, 9)}):
        assert_close(*both("attention", q, k, v, softcap=5.0, **kw), dtype)


# ---- decode, sparse, out= ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch(monkeypatch, dtype):
    """Decode of sequences of uneven lengths (one empty), GQA, sinks, window; several gather batches."""
    monkeypatch.setattr(cpu_paged, "GATHER_BUDGET", 40_000)
    g = gen(9)
    nb, bs, hkv, d = 90, 7, 2, 32
    lens = [100, 0, 1, 57, 250, 13, 7, 99]
    kc, vc = rand(nb, bs, hkv, d, dtype=dtype, gen=g), rand(nb, bs, hkv, d, dtype=dtype, gen=g)
    table = torch.stack([torch.randperm(nb, generator=g)[:37] for _ in lens]).to(torch.int32)
    q = rand(len(lens), 8, d, dtype=dtype, gen=g)
    seqused = torch.tensor(lens, dtype=torch.int32)
    sinks = rand(8, gen=g)
    for kw in ({}, {"window_size": (30, 0), "sinks": sinks}, {"softcap": 4.0}):
        assert_close(*both("paged_attention", q, kc, vc, table, seqused, **kw), dtype)
    one_each = torch.arange(len(lens) + 1, dtype=torch.int32)  # varlen with one query per sequence
    assert_close(*both("paged_attention", q, kc, vc, table, seqused, cu_seqlens_q=one_each), dtype)


@pytest.mark.parametrize("kw", [{"causal": False}, {"causal": True, "window_size": (6, 0)},
                                {"causal": False, "window_size": (3, 2), "softcap": 2.0}])
def test_paged_prefill_ragged_last_block(kw):
    """Chunked prefill whose last cache block is partly filled: positions past seqused_k are never read."""
    g = gen(12)
    kc, vc = rand(20, 5, 2, 16, gen=g), rand(20, 5, 2, 16, gen=g)
    table = torch.randperm(20, generator=g)[:12].view(2, 6).to(torch.int32)
    seqused = torch.tensor([23, 9], dtype=torch.int32)
    q = rand(11, 4, 16, gen=g)
    cu_q = torch.tensor([0, 8, 11], dtype=torch.int32)
    assert_close(*both("paged_attention", q, kc, vc, table, seqused, cu_seqlens_q=cu_q, **kw))


def test_sparse_chunks(monkeypatch):
    monkeypatch.setattr(cpu_sparse, "GATHER_BUDGET", 5_000)
    g = gen(10)
    cu = torch.tensor([0, 30, 30, 75], dtype=torch.int32)
    q, k, v = (rand(75, h, 16, gen=g) for h in (4, 1, 1))
    idx = torch.full((75, 1, 12), -1, dtype=torch.int32)
    for t in range(75):
        n = 30 if t < 30 else 45
        idx[t, 0, :10] = torch.randperm(n, generator=g)[:10]
    idx[3] = -1
    assert_close(*both("sparse_attention", q, k, v, idx, cu_seqlens_q=cu, cu_seqlens_k=cu, sinks=rand(4, gen=g)))


@pytest.mark.parametrize("op", ["attention", "paged_attention", "sparse_attention"])
def test_out_written_fully_and_deterministic(op):
    g = gen(11)
    q, k, v = (rand(64, h, 16, gen=g) for h in (4, 2, 2))
    if op == "attention":
        args, kw = (q, k, v), {"causal": True, "window_size": (9, 3)}
    elif op == "paged_attention":
        kc, vc = k.view(16, 4, 2, 16), v.view(16, 4, 2, 16)
        table = torch.randperm(16, generator=g).to(torch.int32).view(4, 4)
        args, kw = (q[:4], kc, vc, table, torch.tensor([16, 3, 0, 9], dtype=torch.int32)), {}
    else:
        idx = torch.stack([torch.randperm(64, generator=g)[:12].view(2, 6) for _ in range(64)]).to(torch.int32)
        idx[:, :, 4:] = -1
        args, kw = (q, k, v, idx), {}
    base = torch.full((args[0].shape[0], 4, 32), math.nan)
    out = base[:, :, ::2]  # a strided out
    got = getattr(pa, op)(*args, **kw, out=out, backend="cpu")
    assert got is out and not torch.isnan(out).any()
    assert torch.isnan(base[:, :, 1::2]).all()  # nothing outside `out` written
    again = getattr(pa, op)(*args, **kw, backend="cpu")
    assert torch.equal(again, out)
    ref = getattr(pa, op)(*(a.double() if a.is_floating_point() else a for a in args), **kw, backend="reference")
    assert float((out.double() - ref).abs().max()) < 2e-5 * max(1.0, float(ref.abs().max()))
