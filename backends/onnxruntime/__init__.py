"""The onnxruntime backend: every call is a small ONNX graph, built once per call signature and cached with
its InferenceSession (sessions.py), run by ONNX Runtime's fused operators on the execution providers that
PORTABLE_ATTN_ORT_PROVIDERS names. Opt-in by name (`backend="onnxruntime"`): it is in no default priority."""
import functools
import importlib.util
import sys

from portable_attn.backend import Backend
from portable_attn.platforms import Platform


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "portable_attn.backends.onnxruntime.ops"
    platforms = frozenset({Platform.CPU})
    description = ("ONNX Runtime graphs: the attention family on ONNX `Attention` (opset 24; bottom-right causal, "
                   "windows, block masks and top-k sets as a visibility mask, sinks as one more key, lse from its "
                   "scores), paged keys gathered in-graph, cache writes as `ScatterND`; linear attention, the gated "
                   "delta rule and SSD on com.microsoft `GatedDeltaNet`; conv1d on `VarlenCausalConvWithState`; "
                   "step forms as the same graphs over one token per sequence")
    float64 = False
    support = "portable_attn.backends.onnxruntime.support"  # reads ORT's kernel registry, builds no graph
    notes = {
        "attention": "ONNX Attention, dense visibility mask",
        "paged_attention": "Gather + ONNX Attention",
        "sparse_attention": "Gather + masked ONNX Attention",
        "write_kv_cache": "ONNX ScatterND",
        "merge_attention_states": "ONNX elementwise graph",
        **{op: "com.microsoft GatedDeltaNet" for op in ("linear_attention", "linear_attention_step",
                                                        "gated_delta_rule", "gated_delta_rule_step")},
        **{op: "GatedDeltaNet (gated) + D skip and z gate" for op in ("ssd", "ssd_step")},
        **{op: "com.microsoft VarlenCausalConvWithState" for op in ("causal_conv1d", "causal_conv1d_step")},
    }
    limits = ("float64 (use reference); ops whose ONNX kernel no chosen provider registers; attention calls whose "
              "scores (Hq x Tq x Tk, packed sequences in one row) would pass 1 GiB of float32; float16/bfloat16 are "
              "computed in float32 inside the graph")

    def available(self) -> str | None:
        return _missing_package()

    def settings(self) -> str:
        from . import kernels  # imports onnxruntime: only once it is known to be installed

        return f"execution providers {', '.join(kernels.providers())} (PORTABLE_ATTN_ORT_PROVIDERS)"

    def release(self) -> None:
        sessions = sys.modules.get("portable_attn.backends.onnxruntime.sessions")
        if sessions is not None:  # nothing built yet otherwise
            sessions.clear()


@functools.cache  # asked on every call dispatched here; a package search costs tens of microseconds
def _missing_package() -> str | None:
    for package in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(package) is None:
            return f"{package} not installed (pip install 'portable-attn[onnx]')"
    return None


BACKEND = OnnxRuntimeBackend()
