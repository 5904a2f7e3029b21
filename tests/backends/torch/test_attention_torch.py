"""The torch backend beyond the conformance suite: the visible rectangle against brute force, the kernel
calls it makes (no mask where SDPA's own causal mask is exact, one batched call for decode), its
refusals and the fallback they cause. Results are compared with the float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch

import portable_attn as pa
from portable_attn import registry
from portable_attn.backend import Call
from portable_attn.backends.torch import attention as torch_attention
from portable_attn.backends.torch import bands, sdpa
from portable_attn.backends.torch import support
from portable_attn.dispatch import make_call
from portable_attn.platforms import Platform
from tests.backends.compare import against_reference, assert_close, paged_cache


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.fixture
def kernel_calls(monkeypatch):
    """(q shape, k shape, mask given, is_causal) of every kernel call the torch ops make."""
    calls = []
    real = sdpa.attend

    def spy(q, k, v, *, mask, causal, scale, lse):
        calls.append((tuple(q.shape), tuple(k.shape), mask is not None, causal))
        return real(q, k, v, mask=mask, causal=causal, scale=scale, lse=lse)
    monkeypatch.setattr(torch_attention, "attend", spy)
    monkeypatch.setattr("portable_attn.backends.torch.paged.attend", spy)
    return calls


@pytest.mark.parametrize("lq,lk", [(1, 1), (3, 7), (7, 3), (5, 5), (0, 4), (4, 0), (9, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (2, 0), (1, 3), (-1, 1), (4, -1), (20, 20)])
def test_rect_is_the_brute_force_band(lq, lk, causal, window):
    """Rows seeing something, the keys they see, and whether a mask (or SDPA's top-left causal) is exact."""
    vis = torch_attention.band(torch.arange(lq) + lk - lq, torch.arange(lk), causal, window)
    r = bands.rect(lq, lk, causal, window)
    rows = vis.any(1).nonzero().flatten().tolist()
    keys = vis.any(0).nonzero().flatten().tolist()
    assert (r.r0, r.r1) == ((rows[0], rows[-1] + 1) if rows else (0, 0))
    if not rows:
        return
    assert (r.k0, r.k1) == (keys[0], keys[-1] + 1) and keys == list(range(r.k0, r.k1))  # contiguous
    inner = vis[r.r0:r.r1, r.k0:r.k1]
    assert r.masked == (not bool(inner.all()))
    tril = torch.ones(inner.shape, dtype=torch.bool).tril()
    assert r.top_left == (r.masked and torch.equal(inner, tril))


def test_dense_causal_prefill_is_one_unmasked_causal_call(kernel_calls):
    g = torch.Generator().manual_seed(0)
    q, k, v = rand(g, 96, 4, 32), rand(g, 96, 2, 32), rand(g, 96, 2, 32)
    assert_close(*against_reference("torch", "attention", q, k, v, causal=True))
    assert kernel_calls == [((1, 4, 96, 32), (1, 2, 96, 32), False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bottom_right_causal_and_window_are_masked_within_the_visible_keys(kernel_calls, dtype):
    """Tq < Tk: SDPA's is_causal would be top-left; keys before the window's reach are never passed."""
    g = torch.Generator().manual_seed(1)
    q, k, v = rand(g, 20, 4, 32, dtype=dtype), rand(g, 100, 2, 32, dtype=dtype), rand(g, 100, 2, 32, dtype=dtype)
    assert_close(*against_reference("torch", "attention", q, k, v, causal=True, window_size=(15, 0)), dtype)
    (qs, ks, masked, causal), = kernel_calls
    assert ks[2] == 20 + 15 and masked and not causal  # keys 65..99: the last 20 positions and 15 before


def test_decode_batch_is_one_call_over_the_padded_longest_sequence(kernel_calls):
    g = torch.Generator().manual_seed(2)
    kc, vc, table, used = paged_cache(g, [0, 5, 40, 17], 8, 2, 32, 32)
    kc[kc.abs() > 2] = float("nan")  # invisible slots may hold anything; visible ones do not
    kc[table[1, 0].long(), :5] = rand(g, 5, 2, 32)
    for s, n in enumerate(used.tolist()):
        for j in range(n):
            kc[table[s, j // 8].long(), j % 8] = rand(g, 2, 32)
    q = rand(g, 4, 4, 32)
    assert_close(*against_reference("torch", "paged_attention", q, kc, vc, table, used, sinks=rand(g, 4)))
    assert kernel_calls == [((4, 4, 1, 32), (4, 2, 40, 32), True, False)]


def test_packed_ragged_batch_with_a_block_mask():
    g = torch.Generator().manual_seed(3)
    lens = [0, 33, 70]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = rand(g, 103, 4, 16), rand(g, 103, 2, 16), rand(g, 103, 2, 16)
    bm = pa.BlockMask.local_global(70, window=20, global_tokens=[0, 1], block_size=(16, 16))
    assert_close(*against_reference("torch", "attention", q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                    block_mask=bm))


def _call(op="attention", device="cpu", **kw):
    g = torch.Generator().manual_seed(4)
    args = dict(q=rand(g, 8, 2, 16), k=rand(g, 8, 2, 16), v=rand(g, 8, 2, 16)) | kw
    call = make_call(op, args)
    if device != "cpu":  # the checks on CPU tensors, then the device faked for the support check
        meta = {n: (a.to("meta") if isinstance(a, torch.Tensor) and n in "qkv" else a) for n, a in call.args.items()}
        call = Call(op, meta, Platform.CUDA)
    return call


@pytest.mark.parametrize("kw,device,reason", [
    (dict(softcap=5.0), "cpu", "softcap"),
    (dict(return_lse=True), "meta", "return_lse"),
    (dict(sinks=torch.zeros(2)), "meta", "sinks"),
    (dict(v=torch.zeros(8, 2, 8)), "cpu", "value dim 8"),
])
def test_refusals_name_the_feature(kw, device, reason):
    assert reason in support.why_not(_call(device=device, **kw))


def test_accepts_what_it_computes():
    assert support.why_not(_call(causal=True, window_size=(3, 0), return_lse=True, sinks=torch.zeros(2))) is None


def test_a_dense_mask_above_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr(support, "MAX_MASK", 8 * 8 - 1)
    assert "dense mask of 1 x 8 x 8" in support.why_not(_call(causal=True, window_size=(3, 0)))
    assert support.why_not(_call(causal=True)) is None  # SDPA's own causal mask: nothing built


def test_priority_list_falls_back_past_torch_with_its_reason(caplog):
    call = _call(softcap=5.0)
    assert registry.select(call, "torch,cpu").name == "cpu"
    assert "softcap" in caplog.text


def test_cpu_defaults_run_every_attention_call_on_cpu_first(monkeypatch):
    """BENCHMARKS.md, "Routes": after the block-mask tiles of 2026-12-03 no call was faster on torch."""
    monkeypatch.delenv("PORTABLE_ATTN_BACKEND", raising=False)
    bm = pa.BlockMask.local_global(8, window=2, global_tokens=[0], block_size=(4, 4))
    for kw in (dict(causal=True), dict(window_size=(3, 0)), dict(sinks=torch.zeros(2)),
               dict(causal=True, block_mask=bm)):
        assert registry.select(_call(**kw)).name == "cpu"


def test_where_the_cpu_kernel_does_not_share_kv_heads_they_are_repeated(monkeypatch):
    """torch 2.8's CPU flash kernel misreads GQA kv heads (torch_features.py): both backends on it repeat them."""
    from portable_attn import torch_features
    from portable_attn.backends.cpu import tiles

    assert torch_features.cpu_flash_shares_kv_heads() == (torch.__version__.split(".")[:2] != ["2", "8"])
    monkeypatch.setattr(sdpa, "cpu_flash_shares_kv_heads", lambda: False)
    monkeypatch.setattr(tiles, "cpu_flash_shares_kv_heads", lambda: False)
    g = torch.Generator().manual_seed(5)
    q, k, v = rand(g, 70, 8, 16), rand(g, 70, 2, 16), rand(g, 70, 2, 16)
    for backend in ("torch", "cpu"):
        assert_close(*against_reference(backend, "attention", q, k, v, causal=True))
