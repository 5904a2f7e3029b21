"""The onnxruntime backend's plumbing: availability without the package, providers from the environment, support
from ORT's kernel registry, the session cache, in-place writes."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

import portable_attn as pa  # noqa: E402
from portable_attn import registry  # noqa: E402
from portable_attn.dispatch import make_call  # noqa: E402
from portable_attn.errors import NotSupported  # noqa: E402
from portable_attn.backends.onnxruntime import kernels, sessions, support  # noqa: E402

ORT = "onnxruntime"


def test_unavailable_without_onnxruntime_and_the_rest_still_works():
    """In a fresh process where `import onnxruntime` cannot find the package."""
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'onnxruntime': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = (lambda f: lambda n, *a: None if n == 'onnxruntime' else f(n, *a))"
        "(importlib.util.find_spec)\n"
        "import torch, portable_attn as pa\n"
        "from portable_attn import registry\n"
        "print(registry.get('onnxruntime').available())\n"
        "q = torch.randn(4, 2, 8)\n"
        "print(pa.attention(q, q, q, backend='cpu').shape)\n"
        "try:\n"
        "    pa.attention(q, q, q, backend='onnxruntime')\n"
        "except Exception as e: print(type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "onnxruntime not installed (pip install 'portable-attn[onnx]')"
    assert lines[1] == "torch.Size([4, 2, 8])" and lines[2] == "BackendUnavailable"


def test_providers_from_the_environment(monkeypatch):
    monkeypatch.delenv("PORTABLE_ATTN_ORT_PROVIDERS", raising=False)
    assert kernels.providers()[-1] == kernels.CPU
    monkeypatch.setenv("PORTABLE_ATTN_ORT_PROVIDERS", "CPUExecutionProvider")
    assert kernels.providers() == (kernels.CPU,)
    assert "execution providers CPUExecutionProvider" in registry.get(ORT).settings()
    monkeypatch.setenv("PORTABLE_ATTN_ORT_PROVIDERS", "NoSuchExecutionProvider,CPUExecutionProvider")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider.*available: "):
        kernels.providers()


def test_support_comes_from_the_kernel_registry(monkeypatch):
    q = torch.randn(3, 2, 8)
    call = make_call("attention", {"q": q, "k": q, "v": q})
    assert registry.why_not(registry.get(ORT), call) is None
    monkeypatch.setattr(kernels, "registry", lambda: {})  # a build without the kernels
    reason = registry.why_not(registry.get(ORT), call)
    assert "registers no float32 ai.onnx Attention (opset 24) kernel" in reason
    with pytest.raises(NotSupported, match="Attention"):
        pa.attention(q, q, q, backend=ORT)


def test_the_cpu_provider_registers_what_the_graphs_need():
    """onnxruntime 1.32's CPU provider has every kernel the graphs use (float32)."""
    for domain, op, opset in set(kernels.NEEDS.values()):
        assert kernels.CPU in kernels.runs_on(domain, op, opset), (domain, op)
    assert not kernels.runs_on("com.microsoft", "PagedAttention", 1)  # CUDA only: paged keys are gathered


def test_a_huge_score_matrix_is_refused():
    q = torch.zeros(1, 1, 8).expand(20000, 1, 8)  # strides 0: no memory; 4e8 scores
    reason = registry.why_not(registry.get(ORT), make_call("attention", {"q": q, "k": q, "v": q, "causal": True}))
    assert reason == ("ONNX Attention would hold 1.5 GiB of float32 scores (1 heads x 20000 queries x 20000 keys, "
                      "packed sequences in one row); the limit is 1 GiB")
    assert support.MAX_SCORES == 2 ** 28


def test_a_huge_key_copy_is_refused():
    """Keys and values of 2 heads x (1 + 1) dims: 2**26 keys are 1 GiB of float32 (allowed), one more is not."""
    q = torch.zeros(1, 2, 1)
    for n, allowed in ((2 ** 26, True), (2 ** 26 + 1, False)):
        k = torch.zeros(1, 1, 1).expand(n, 2, 1)  # strides 0: no memory
        reason = registry.why_not(registry.get(ORT), make_call("attention", {"q": q, "k": k, "v": k}))
        assert (reason is None) == allowed, reason
    assert "would copy 1.0 GiB of float32 keys and values" in reason


def test_no_keys_runs_no_graph():
    """A sparse call over an empty key set (topk > 0, every slot -1): o = 0, lse = the sink or -inf."""
    q, k = torch.randn(2, 2, 4), torch.zeros(0, 1, 4)
    idx = torch.full((2, 1, 3), -1, dtype=torch.int32)
    o, lse = pa.sparse_attention(q, k, k, idx, sinks=torch.tensor([0.5, -1.0]), return_lse=True, backend=ORT)
    assert (o == 0).all() and torch.equal(lse, torch.tensor([[0.5, 0.5], [-1.0, -1.0]]))


def test_one_session_per_signature():
    sessions.clear()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 2, 8, generator=g), torch.randn(7, 2, 8, generator=g)
    pa.attention(q, k, k, causal=True, backend=ORT)
    pa.attention(q[:3].bfloat16(), k.bfloat16(), k.bfloat16(), causal=True, backend=ORT)  # other shapes, dtype
    assert len(sessions._SESSIONS) == 1
    pa.attention(q, k, k, causal=True, softcap=2.0, backend=ORT)
    assert len(sessions._SESSIONS) == 2


def test_state_cache_rows_in_place():
    """The final states land in the caller's cache rows; the others stay bit-identical."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(4, 3, generator=g)
    cache = torch.randn(5, 4, 2, generator=g)
    before = cache.clone()
    idx = torch.tensor([3, 1], dtype=torch.int32)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, final = pa.causal_conv1d(x, w, initial_state=cache, state_indices=idx, cu_seqlens=cu,
                                  output_final_state=True, backend=ORT)
    assert final is cache
    for r in (0, 2, 4):
        assert torch.equal(cache[r], before[r])
    ref = before.clone()
    pa.causal_conv1d(x, w, initial_state=ref, state_indices=idx, cu_seqlens=cu, backend="reference")
    assert torch.allclose(cache, ref, atol=1e-6)
