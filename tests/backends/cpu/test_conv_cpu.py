"""The cpu backend's compiled causal conv1d (conv.cpp), sequence and step forms: strided views with NaN around them,
only the state rows listed updated, nothing else written. (Their conformance cases with and without the kernels:
test_native_cpu.py.)"""
import math

import pytest
import torch

import portable_attn as pa
from tests.backends.cpu.test_recurrent_kernels_cpu import bits, in_nan, nan_around, tol
from tests.backends.cpu.test_native_cpu import spy_on

@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("channels", [8, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sequences_match_reference(monkeypatch, width, channels, dtype):
    """Sequences shorter than the state, empty, and long; x rows between NaN rows, a NaN-filled out= with gaps, bias
    and silu, initial states from a cache (rows out of order, one not read): out and the final states as the
    reference's, the cache's other rows and every NaN untouched."""
    calls = spy_on(monkeypatch, "conv_seq")
    gen = torch.Generator().manual_seed(width * channels)
    cu = torch.tensor([0, 1, 1, 40, 43], dtype=torch.int32)
    x = torch.randn(43, channels, generator=gen).to(dtype)
    weight, bias = torch.randn(channels, width, generator=gen), torch.randn(channels, generator=gen)
    cache = torch.randn(6, channels, width - 1, generator=gen).to(dtype)
    rows, has = torch.tensor([4, 0, 2, 5], dtype=torch.int32), torch.tensor([True, True, False, True])
    xv, xb = in_nan(x[:, None], every_other=False)
    xv = xv[:, 0]
    out, ob = in_nan(torch.full((43, 1, channels), math.nan, dtype=dtype), every_other=False)
    out = out[:, 0]
    before, cache_before = xb.clone(), cache.clone()
    got, final = pa.causal_conv1d(xv, weight, bias, activation="silu", initial_state=cache, state_indices=rows,
                                  has_initial_state=has, cu_seqlens=cu, out=out, backend="cpu")
    assert got is out and final is None and len(calls) == 1
    ref_cache = cache_before.double()
    ref, _ = pa.causal_conv1d(x.double(), weight.double(), bias.double(), activation="silu", initial_state=ref_cache,
                              state_indices=rows, has_initial_state=has, cu_seqlens=cu, backend="reference")
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(cache.double(), ref_cache.to(dtype).double(), **tol(dtype))
    assert torch.equal(bits(cache[[1, 3]]), bits(cache_before[[1, 3]]))
    assert torch.equal(bits(xb), bits(before))
    assert nan_around(ob)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_step_matches_reference(monkeypatch, width, dtype):
    """A step over a strided cache with NaN around its rows, x every other element, rows out of order with a -1: out
    and the listed rows as the reference's, the other rows and the NaN untouched."""
    calls = spy_on(monkeypatch, "conv_step")
    gen = torch.Generator().manual_seed(width)
    bsz, channels = 3, 37
    x = torch.randn(bsz, 1, channels, generator=gen).to(dtype)
    weight, bias = torch.randn(channels, width, generator=gen).to(dtype), torch.randn(channels, generator=gen)
    state = torch.randn(5, channels, width - 1, generator=gen).to(dtype)
    rows = torch.tensor([3, -1, 0], dtype=torch.int32)
    xv, xb = in_nan(x, every_other=True)
    sv, sb = in_nan(state, every_other=False)
    before = xb.clone()
    got = pa.causal_conv1d_step(xv[:, 0], weight, bias, state=sv, state_indices=rows, activation="silu",
                                backend="cpu")
    assert len(calls) == 1
    ref_state = state.double()
    ref = pa.causal_conv1d_step(x[:, 0].double(), weight.double(), bias.double(), state=ref_state, state_indices=rows,
                                activation="silu", backend="reference")
    torch.testing.assert_close(got.double(), ref, **tol(dtype))
    torch.testing.assert_close(sv.double(), ref_state.to(dtype).double(), **tol(dtype))
    assert torch.equal(bits(sv[[1, 2, 4]]), bits(state[[1, 2, 4]]))
    assert torch.equal(bits(xb), bits(before))
    assert nan_around(sb)
