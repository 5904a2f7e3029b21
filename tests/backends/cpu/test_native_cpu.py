"""The cpu backend's compiled kernels (backends/cpu/native.py): decode (decode.cpp) for paged_attention and
attention, prefill attention (flash.cpp), the softcap pass (softcap.cpp) of the attention ops, the gated delta rule and the SSD step
(recurrent.cpp), conv1d (conv.cpp), and the torch paths they replace: both pass the conformance cases, and a machine
that cannot build them falls back. (The recurrent kernels' own tests: test_recurrent_kernels_cpu.py and
test_conv_cpu.py.)"""
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import portable_attn as pa
from portable_attn.backends.cpu import attention, native
from portable_attn.conformance import FULL, catalogue, run_case
from portable_attn.envs import lookup
from tests.backends.cpu.test_host_paths_cpu import nan_padded

SOFTCAPPED = [c for c in catalogue(FULL, ["paged_attention", "attention", "sparse_attention"])
              if c.make(np.random.default_rng(0)).get("softcap", 0) > 0]  # softcap.cpp's calls
DECODES_AND_PAGED = [c for c in catalogue(FULL, ["paged_attention", "attention"])
                     if c.op == "paged_attention" or "decode" in c.name]  # attention's decode cases: decode.cpp's calls
# the recurrent ops' kernels (recurrent.cpp, conv.cpp) and the cases that reach them
KERNELS = {"gated_delta_rule": "delta_seq", "gated_delta_rule_step": "delta_step", "ssd": "ssd_seq",
           "ssd_step": "ssd_step", "causal_conv1d": "conv_seq", "causal_conv1d_step": "conv_step",
           "linear_attention": "delta_seq", "linear_attention_step": "delta_step"}
RECURRENT = catalogue(FULL, list(KERNELS))


def _prefill(case) -> bool:
    """Whether an attention case's call reaches flash.cpp: more than FEW_QUERIES queries."""
    return case.make(np.random.default_rng(0))["q"].shape[0] > attention.FEW_QUERIES


# the prefills: causal, windows, dense, softcap, block masks
PREFILLS = [c for c in catalogue(FULL, ["attention"]) if _prefill(c)]
CASES = list({id(c): c for c in DECODES_AND_PAGED + SOFTCAPPED + RECURRENT + PREFILLS}.values())


def spy_on(monkeypatch, *kernels: str) -> list:
    """The arguments of each call of the compiled module's `kernels` from here on, its other kernels as they are
    (skips where this machine cannot build it)."""
    built = native.kernels()
    if built is None:
        pytest.skip("the cpu backend's compiled kernels cannot be built here (see the logged reason)")
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(built, name)

    def counted(kernel):
        def call(*args, **kwargs):
            calls.append((*args, *kwargs.values()))
            return getattr(built, kernel)(*args, **kwargs)
        return call

    spy = Spy()
    for kernel in kernels:
        setattr(spy, kernel, counted(kernel))
    monkeypatch.setitem(native.BUILT, lookup(native.SWITCH), spy)  # the module the ops read under this switch
    return calls


@pytest.fixture
def spy(monkeypatch):
    """Counts the compiled decode kernel's calls."""
    return spy_on(monkeypatch, "decode")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.name}" for c in CASES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_path_conforms(case, dtype, monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"


@pytest.mark.parametrize("case", RECURRENT, ids=[f"{c.op}-{c.name}" for c in RECURRENT])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_recurrent_cases_reach_kernels(case, dtype, monkeypatch):
    """The gated delta rule's, linear attention's, SSD's and conv1d's cases with the kernels on: each reaches
    its kernel, but a conv whose channels are not adjacent (its torch path; a step whose strided layout leaves a
    state's last two axes non-contiguous reaches its kernel, which leaves it to the torch path)."""
    calls = spy_on(monkeypatch, KERNELS[case.op])
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"
    assert calls or (case.layout and case.op == "causal_conv1d")


@pytest.mark.parametrize("case", PREFILLS, ids=[c.name for c in PREFILLS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_prefill_cases_reach_flash(case, dtype, monkeypatch):
    """The prefill cases (causal, windows, dense, chunked, varlen, softcap, sinks, block masks) conform with the kernels
    on, and reach flash.cpp."""
    calls = spy_on(monkeypatch, "flash")
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"
    assert calls


@pytest.mark.parametrize("case", SOFTCAPPED, ids=[f"{c.op}-{c.name}" for c in SOFTCAPPED])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softcap_runs_compiled_pass(case, dtype, monkeypatch):
    """The softcap cases conform with their score rows through softcap.cpp (or decode.cpp's, flash.cpp's own softcap
    for a decode, a prefill), and do reach them."""
    calls = spy_on(monkeypatch, "softcap_softmax", "decode", "flash")
    res = run_case("cpu", case, dtype)
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"
    assert calls


def _decode_call(dtype, gen):
    nb, bs, hkv, d = 24, 16, 2, 64
    k_cache, v_cache = (torch.randn(nb, bs, hkv, d, generator=gen).to(dtype) for _ in range(2))
    table = torch.randperm(nb, generator=gen).view(3, 8).to(torch.int32)
    return dict(q=torch.randn(3, 8, d, generator=gen).to(dtype), k_cache=k_cache, v_cache=v_cache,
                block_table=table, seqused_k=torch.tensor([100, 1, 128], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_runs_compiled_kernel(spy, dtype, monkeypatch):
    args = _decode_call(dtype, torch.Generator().manual_seed(1))
    kwargs = dict(window_size=(40, 0), softcap=20.0, sinks=torch.randn(8), return_lse=True, backend="cpu")
    o, lse = pa.paged_attention(**args, **kwargs)
    assert len(spy) == 1
    monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    o_torch, lse_torch = pa.paged_attention(**args, **kwargs)
    assert len(spy) == 1
    o_ref, lse_ref = pa.paged_attention(**{n: x.double() if x.is_floating_point() else x for n, x in args.items()},
                                        **{**kwargs, "backend": "reference"})
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (o.double() - o_ref).abs().max() <= tol and (lse.double() - lse_ref).abs().max() <= tol
    assert (o_torch.double() - o_ref).abs().max() <= tol


def test_unbuildable_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    native._built.cache_clear()
    native.BUILT.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="portable_attn"):
            assert native.kernels() is None
        assert "compiled kernels are unavailable (Ninja is required" in caplog.text
        args = _decode_call(torch.float32, torch.Generator().manual_seed(2))
        o = pa.paged_attention(**args, backend="cpu")
        ref = pa.paged_attention(**{n: x.double() if x.is_floating_point() else x for n, x in args.items()},
                                 backend="reference")
        assert (o.double() - ref).abs().max() <= 1e-5
    finally:
        native._built.cache_clear()  # the next use builds (or loads the cached build) again
        native.BUILT.clear()


def test_window_reads_only_its_keys(spy):
    """Decode with a window of 10 over 500 keys: every other cache row NaN, the output as without them."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(70, 8, 2, 16, generator=gen) for _ in range(2))
    table = torch.randperm(70, generator=gen)[:63].to(torch.int32)[None]
    args = dict(q=torch.randn(1, 4, 16, generator=gen), block_table=table,
                seqused_k=torch.tensor([500], dtype=torch.int32), window_size=(9, 0), backend="cpu")
    expected = pa.paged_attention(k_cache=k_cache, v_cache=v_cache, **args)
    slots = table[0].long()[:, None] * 8 + torch.arange(8)  # [63, 8]: the slot of each key position
    keep = slots.flatten()[490:500]
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, 2, 16)
        kept = flat[keep].clone()
        flat.fill_(math.nan)
        flat[keep] = kept
    got = pa.paged_attention(k_cache=k_cache, v_cache=v_cache, **args)
    assert len(spy) == 2 and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_decode_runs_compiled_kernel(spy, dtype, varlen):
    """Decode through `attention` (one query per sequence, at its last key): strided views with NaN between
    rows and heads, a window, softcap and sinks, a NaN-filled out= written fully; one kernel call, output
    and lse as the reference's."""
    gen = torch.Generator().manual_seed(4)
    lens = [37, 1, 0, 64] if varlen else [50]
    q, k, v = (nan_padded(torch.randn(n, h, 16, generator=gen).to(dtype))
               for n, h in ((len(lens), 4), (sum(lens), 2), (sum(lens), 2)))
    cu = dict(cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).to(torch.int32)) if varlen else {}
    kwargs = dict(causal=True, window_size=(20, 0), softcap=15.0, sinks=torch.randn(4, generator=gen), return_lse=True,
                  **cu)
    out = torch.full((len(lens), 4, 16), math.nan, dtype=dtype)
    o, lse = pa.attention(q, k, v, **kwargs, out=out, backend="cpu")
    assert o is out and len(spy) == 1
    ro, rlse = pa.attention(q.double(), k.double(), v.double(), **kwargs, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (o.double() - ro).abs().max() <= tol and (lse.double() - rlse).abs().max() <= tol



@pytest.mark.parametrize("hq,hkv,d,dv", [(12, 4, 20, 24), (16, 2, 48, 48), (4, 4, 64, 32), (6, 2, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("every_other", [False, True])
def test_decode_head_shapes(spy, hq, hkv, d, dv, dtype, every_other):
    """The kernel's blockings: query heads per kv head in blocks of 4, 2 and 1; head dims that are no multiple of
    the vector width (scalar tails) or of 32 (bfloat16 keys converted rather than paired); Dv != D; caches whose
    elements sit every other one (rows staged). Against the reference, a key count that ends mid tile."""
    gen = torch.Generator().manual_seed(hq * d + dv)
    nb, bs = 12, 8
    k_cache, v_cache = (torch.randn(nb, bs, hkv, w, generator=gen).to(dtype) for w in (d, dv))
    if every_other:  # the same values every other element of a NaN-filled buffer
        k_cache, v_cache = (torch.stack([torch.full_like(c, math.nan), c], -1).flatten(-2)[..., 1::2]
                            for c in (k_cache, v_cache))
    args = dict(q=torch.randn(2, hq, d, generator=gen).to(dtype), k_cache=k_cache, v_cache=v_cache,
                block_table=torch.randperm(nb, generator=gen).view(2, 6).to(torch.int32),
                seqused_k=torch.tensor([45, 19], dtype=torch.int32), return_lse=True)
    o, lse = pa.paged_attention(**args, backend="cpu")
    assert len(spy) == 1
    ro, rlse = pa.paged_attention(**{n: x.double() if torch.is_tensor(x) and x.is_floating_point() else x
                                     for n, x in args.items()}, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (o.double() - ro).abs().max() <= tol and (lse.double() - rlse).abs().max() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lone_query_runs_compiled_kernel(spy, dtype):
    """The plainest decode call (one query that sees every key, no out=) takes the compiled kernel as well."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(n, h, 64, generator=gen).to(dtype) for n, h in ((1, 8), (77, 2), (77, 2)))
    o = pa.attention(q, k, v, causal=True, backend="cpu")
    assert len(spy) == 1 and o.is_contiguous()
    ref = pa.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert (o.double() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_builds_conform(capability):
    """The kernel built for a narrower vector width than this machine's (ATEN_CPU_CAPABILITY lowers torch's, and
    native.py builds for torch's): AVX2's 8-lane sums and conversions, or ATen's generic vectors. The attention,
    paged and delta-rule step conformance cases (softcap ones included) pass in a fresh process (about a minute
    per first build)."""
    code = ("import sys; from portable_attn import cli; from portable_attn.backends.cpu import native; "
            "built = native.kernels(); "
            f"assert built is not None and '_{capability}_' in built.__name__, built; "
            "sys.exit(cli.main(['check', '--backend', 'cpu', '--op', 'attention', '--op', 'paged_attention', "
            "'--op', 'gated_delta_rule_step', '--strict', '--quiet']))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " 0 failed" in run.stdout
