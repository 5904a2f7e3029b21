"""What the installed ONNX Runtime can run: the execution providers chosen (PORTABLE_ATTN_ORT_PROVIDERS, else
every available one, CPU last) and its kernel registry per provider. Support is read from the registry, never
from a table of versions."""
from __future__ import annotations

import functools

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _C

from portable_attn import envs

CPU = "CPUExecutionProvider"
MICROSOFT = "com.microsoft"
OPSET = 24  # ONNX Attention with `qk_matmul_output_mode` 2 (scores after softcap and mask)

# (domain, op, opset) each op's graph needs besides standard tensor ops; graphs compute in float32
NEEDS = {
    "attention": ("", "Attention", OPSET),
    "paged_attention": ("", "Attention", OPSET),
    "sparse_attention": ("", "Attention", OPSET),
    "write_kv_cache": ("", "ScatterND", OPSET),
    "merge_attention_states": ("", "IsInf", OPSET),  # elementwise ops only; IsInf is the newest of them
    **{op: (MICROSOFT, "GatedDeltaNet", 1) for op in ("linear_attention", "linear_attention_step", "gated_delta_rule",
                                                      "gated_delta_rule_step", "ssd", "ssd_step")},
    **{op: (MICROSOFT, "VarlenCausalConvWithState", 1) for op in ("causal_conv1d", "causal_conv1d_step")},
}


def providers() -> tuple:
    """The session's providers in priority order: PORTABLE_ATTN_ORT_PROVIDERS, else every available one with
    the CPU last (ORT's CPU kernels also run whatever the others leave)."""
    available = ort.get_available_providers()
    chosen = envs.PORTABLE_ATTN_ORT_PROVIDERS
    if chosen:
        unknown = [p for p in chosen if p not in available]
        if unknown:
            raise ValueError(f"PORTABLE_ATTN_ORT_PROVIDERS names {', '.join(unknown)}, which this onnxruntime "
                             f"{ort.__version__} build lacks; available: {', '.join(available)}")
        return tuple(chosen)
    return tuple(p for p in available if p != CPU) + ((CPU,) if CPU in available else ())


@functools.cache
def registry() -> dict:
    """(domain, op) -> {provider: [(first opset, last opset, float32 kernel)]} from the installed build."""
    found: dict = {}
    for k in _C.get_all_opkernel_def():
        floats = any("tensor(float)" in types for types in k.type_constraints.values())
        found.setdefault((k.domain, k.op_name), {}).setdefault(k.provider, []).append((*k.version_range, floats))
    return found


def runs_on(domain: str, op: str, opset: int) -> tuple:
    """The chosen providers (the CPU always among them: ORT falls back to it) with a float32 kernel of `op`."""
    kernels = registry().get((domain, op), {})
    chosen = providers() + (() if CPU in providers() else (CPU,))
    return tuple(p for p in chosen if any(lo <= opset <= hi and floats for lo, hi, floats in kernels.get(p, ())))


def why_missing(op: str) -> str | None:
    """None when a chosen provider registers the kernel `op`'s graph needs, else the reason."""
    domain, name, opset = NEEDS[op]
    if runs_on(domain, name, opset):
        return None
    where = f"{domain or 'ai.onnx'} {name} (opset {opset})"
    return (f"onnxruntime {ort.__version__} registers no float32 {where} kernel on "
            f"{', '.join(providers()) or 'any provider'}")
