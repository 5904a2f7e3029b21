"""What a backend declares: its platforms, an availability probe and per-op support checks.

Declaring a backend must stay cheap: the kernel module named by ``module`` is imported only when a
call is dispatched to it (Triton fixes its interpret mode when a kernel is decorated).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from .platforms import Platform

OPS = (
    "attention", "paged_attention", "write_kv_cache", "sparse_attention",
    "linear_attention", "linear_attention_step", "gated_delta_rule", "gated_delta_rule_step",
    "ssd", "ssd_step", "causal_conv1d", "causal_conv1d_step",
)


@dataclasses.dataclass(frozen=True)
class Call:
    """One checked call: the op name, its normalised arguments and the platform of its inputs."""

    op: str
    args: dict[str, Any]
    platform: Platform

    @property
    def dtype(self):
        return self.args[_PRIMARY[self.op]].dtype


_PRIMARY = {op: "x" if op.startswith(("ssd", "causal_conv1d")) else "q" for op in OPS}
_PRIMARY["write_kv_cache"] = "k"


class Backend:
    """Base class; subclasses set the class attributes and override the probes they need."""

    name: str = ""
    module: str = ""                      # implementation module, one function per op
    platforms: frozenset = frozenset()    # platforms served without interpret mode
    array: str = "torch"                  # "torch" or "jax"
    ops: tuple = OPS
    description: str = ""
    limits: str = ""                      # what `supports` refuses, in words, for `portable-attn info`
    float64: bool = True                  # takes float64 inputs (only the reference does in practice)
    interpretable: bool = False           # serves the CPU in interpret mode (PORTABLE_ATTN_INTERPRET=1)
    support: str = ""                     # module with `why_not(call)`: the per-input support checks,
                                          # importable without the kernels
    notes: dict = {}                      # op -> how it is implemented, where that is not the backend's
                                          # usual kind of kernel (shown in the support matrix)

    def available(self) -> str | None:
        """None when usable on this machine, else the reason it is not."""
        return None

    def serves(self, platform: Platform) -> str | None:
        if platform in self.platforms:
            return None
        if platform == Platform.CPU and self.interpretable:
            from .registry import interpret_mode  # the registry imports this module
            if interpret_mode():
                return None
        return f"runs on {', '.join(sorted(p.value for p in self.platforms))}, not {platform.value}"

    def supports(self, call: Call) -> str | None:
        """None when this backend handles these inputs, else the reason (checked after `serves`)."""
        if call.op not in self.ops:
            return f"{call.op} is not implemented"
        if not self.float64 and call.dtype == torch.float64:
            return "float64 is the reference's job (use backend='reference')"
        if self.support:
            return importlib.import_module(self.support).why_not(call)
        return None

    def impl(self):
        return importlib.import_module(self.module)

    def release(self) -> None:
        """Drop what the backend keeps per input shape (compiled programs). The conformance suite calls
        it between cases: a process that meets thousands of shapes would otherwise run out of memory
        maps (XLA's CPU executables hold ~8 each; Linux allows 65530)."""

    def run(self, call: Call):
        return getattr(self.impl(), call.op)(**call.args)

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
