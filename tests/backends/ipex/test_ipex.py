"""The ipex backend: its availability reasons (here, without IPEX) and, where IPEX 2.8 is installed (its own
venv, .ci/run's cpu-ipex step), its routes beside the float64 reference on what the conformance suite
cannot reach (it asks every attention case for lse, and its caches are not heads-major)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import portable_attn as pa
from portable_attn import registry
from portable_attn.backends import ipex as ipex_backend
from portable_attn.platforms import Platform
from tests.backends.compare import ATOL

IPEX = registry.get("ipex").available() is None
needs_ipex = pytest.mark.skipif(not IPEX, reason=f"ipex unavailable: {registry.get('ipex').available()}")


def test_missing_ipex_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = ipex_backend.BACKEND.available()
    assert "intel-extension-for-pytorch not installed (archived upstream" in reason
    assert "torch==2.8.0 intel-extension-for-pytorch==2.8.0" in reason


def test_a_torch_that_is_not_its_pin_is_named(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert ipex_backend.BACKEND.available() == ("IPEX 2.8 needs torch 2.8, this is torch 2.13.0 (IPEX is archived: "
                                                "no newer release)")


def test_opt_in_only():
    assert all("ipex" not in names for names in registry.DEFAULT_PRIORITY.values())
    assert ipex_backend.BACKEND.platforms == {Platform.CPU}


def close(got, ref, dtype):
    assert not torch.isnan(got).any()
    assert float((got.double() - ref).abs().max()) <= ATOL[dtype] * max(1.0, float(ref.abs().max()))


def heads_major(g, nb, bs, hkv, d, dtype):
    """A cache stored as IPEX keeps it, [NB, Hkv, BS, D], seen through SPEC's [NB, BS, Hkv, D] view."""
    return torch.randn(nb, hkv, bs, d, generator=g).to(dtype).transpose(1, 2)


@needs_ipex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_packed_causal_gqa(dtype):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, h, 32, generator=g).to(dtype) for h in (4, 2, 2))
    got = pa.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="ipex")
    close(got, pa.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                            backend="reference"), dtype)


@needs_ipex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_reads_only_used_slots(dtype):
    g = torch.Generator().manual_seed(1)
    kc, vc = heads_major(g, 12, 16, 2, 32, dtype), heads_major(g, 12, 16, 2, 32, dtype)
    table = torch.randperm(12, generator=g)[:9].view(3, 3).to(torch.int32)
    used = torch.tensor([0, 17, 48], dtype=torch.int32)
    for s, n in enumerate(used.tolist()):  # stale memory past each sequence's keys
        for j in range(n, 48):
            kc[table[s, j // 16].long(), j % 16] = float("nan")
    q = torch.randn(3, 4, 32, generator=g).to(dtype)
    got = pa.paged_attention(q, kc, vc, table, used, backend="ipex")
    ref = pa.paged_attention(q.double(), kc.double(), vc.double(), table, used, backend="reference")
    close(got, ref, dtype)


@needs_ipex
def test_write_kv_cache_skips_padding_slots():
    g = torch.Generator().manual_seed(2)
    kc, vc = (torch.zeros(4, 2, 8, 16).transpose(1, 2) for _ in range(2))  # heads-major storage
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 17, 31, -1])
    pa.write_kv_cache(k, v, kc, vc, slots, backend="ipex")
    flat = kc.reshape(32, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], k[t])
    assert int(flat.abs().sum(-1).sum(-1).ne(0).sum()) == 3


@needs_ipex
@pytest.mark.parametrize("kw,reason", [
    (dict(window_size=(3, 0)), "windows"), (dict(softcap=5.0), "softcap"), (dict(return_lse=True), "lse"),
])
def test_refusals(kw, reason):
    q = torch.randn(8, 2, 16)
    with pytest.raises(pa.NotSupported, match=reason):
        pa.attention(q, q, q, causal=True, backend="ipex", **kw)


@needs_ipex
def test_spec_layout_cache_is_refused_with_the_view_to_pass():
    kc = torch.zeros(4, 8, 2, 16)
    with pytest.raises(pa.NotSupported, match="heads-major cache"):
        pa.write_kv_cache(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), kc, kc.clone(), torch.tensor([0]),
                          backend="ipex")
