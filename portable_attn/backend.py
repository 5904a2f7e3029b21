"""What a backend declares: its platforms, an availability probe and per-op support checks.

Declaring a backend must stay cheap: the kernel module named by ``module`` is imported only when a
call is dispatched to it (Triton fixes its interpret mode when a kernel is decorated).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import torch

from . import envs
from .optable import NAMES, OPS
from .platforms import Platform


@dataclasses.dataclass(frozen=True)
class Call:
    """One checked call: the op name, its normalised arguments and the platform of its inputs."""

    op: str
    args: dict[str, Any]
    platform: Platform

    @property
    def dtype(self):
        return self.args[OPS[self.op].primary].dtype

    @functools.cached_property
    def needs_grad(self) -> bool:
        """Autograd would record this call: grad mode is on and a tensor argument requires grad."""
        if not torch.is_grad_enabled():
            return False
        for x in self.args.values():  # a plain loop: this runs on every call where grad mode is on
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return True
        return False



class Backend:
    """Base class; subclasses set the class attributes and override the probes they need."""

    name: str = ""
    module: str = ""                      # implementation module, one function per op
    platforms: frozenset = frozenset()    # platforms served without interpret mode
    array: str = "torch"                  # "torch" or "jax"
    ops: tuple = NAMES                    # the ops it implements (optable.NAMES: all of them)
    description: str = ""
    limits: str = ""                      # what `supports` refuses, in words, for `portable-attn info`
    float64: bool = True                  # takes float64 inputs (only the reference does in practice)
    interpretable: bool = False           # serves the CPU in interpret mode (PORTABLE_ATTN_INTERPRET=1)
    support: str = ""                     # module with `why_not(call)`: the per-input support checks,
                                          # importable without the kernels
    notes: dict = {}                      # op -> how it is implemented, where that is not the backend's
                                          # usual kind of kernel (shown in the support matrix)
    backward: frozenset = frozenset()     # ops with a tested backward; the others refuse inputs that
                                          # require grad (SPEC "Autograd": inference ops)
    checks_values: frozenset = frozenset()  # ops whose function checks the op's index values itself on every
                                          # call, before it writes: a remembered call skips `Op.values`

    def available(self) -> str | None:
        """None when usable on this machine, else the reason it is not."""
        return None

    def serves(self, platform: Platform) -> str | None:
        if platform in self.platforms:
            return None
        if platform == Platform.CPU and self.interpretable and envs.PORTABLE_ATTN_INTERPRET:
            return None
        return f"runs on {', '.join(sorted(p.value for p in self.platforms))}, not {platform.value}"

    def supports(self, call: Call) -> str | None:
        """None when this backend handles these inputs, else the reason (checked after `serves`)."""
        if call.op not in self.ops:
            return f"{call.op} is not implemented"
        if not self.float64 and call.dtype == torch.float64:
            return "float64 is the reference's job (use backend='reference')"
        if call.op not in self.backward and call.needs_grad:
            return ("inference only, no backward: a tensor argument requires grad; call it under torch.no_grad() "
                    "or torch.inference_mode(), or pass .detach()ed tensors")
        if self.support:
            return self._module("support").why_not(call)
        return None

    def impl(self):
        return self._module("module")

    def _module(self, attr: str):
        """The module named by `attr` ("module" or "support"), imported on first use and kept: every call
        dispatched to this backend asks for it."""
        found = self.__dict__.get("_loaded_" + attr)
        if found is None:
            found = self.__dict__["_loaded_" + attr] = importlib.import_module(getattr(self, attr))
        return found

    def settings(self) -> str:
        """What the backend resolved from its environment variables, for `portable-attn info` ("" if nothing)."""
        return ""

    def release(self) -> None:
        """Drop what the backend keeps per input shape (compiled programs). The conformance suite calls
        it between cases: a process that meets thousands of shapes would otherwise run out of memory
        maps (XLA's CPU executables hold ~8 each; Linux allows 65530)."""

    def run(self, call: Call):
        return getattr(self.impl(), call.op)(**call.args)

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
