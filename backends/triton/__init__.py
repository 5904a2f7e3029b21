"""The triton backend: one kernel source for NVIDIA, AMD and Intel GPUs (and Triton's interpreter on
the CPU, by name, when PORTABLE_ATTN_INTERPRET=1)."""
import importlib.util
import os

import torch

from portable_attn.backend import Backend
from portable_attn.platforms import Platform, triton_xpu
from portable_attn import envs


class TritonBackend(Backend):
    name = "triton"
    module = "portable_attn.backends.triton.ops"
    platforms = frozenset({Platform.CUDA, Platform.ROCM, Platform.XPU})
    description = ("Triton kernels: online softmax over visible key blocks, paged and split-KV decode; chunked "
                   "recurrences (WY delta rule), one-launch step forms")
    float64 = False
    interpretable = True
    support = "portable_attn.backends.triton.support"  # plain Python: importing it loads no kernel
    limits = ("float64 (use reference); attention head dims D or Dv above 256; state key dims above 256 in "
              "gated_delta_rule and the step forms; conv width W above 256")

    def available(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton not installed (pip install 'portable-attn[cuda]')"
        if envs.PORTABLE_ATTN_INTERPRET:
            return None
        if torch.cuda.is_available():
            return None
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return None if triton_xpu() else ("an Intel GPU, but Triton has no XPU backend here: install torch from "
                                              "PyTorch's XPU index, which brings it (ci/install.sh xpu)")
        return "no GPU here, and interpret mode is off (PORTABLE_ATTN_INTERPRET=1 runs the kernels on the CPU)"

    def impl(self):
        if envs.PORTABLE_ATTN_INTERPRET:  # Triton fixes the mode when a kernel is decorated, i.e. on this import
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return super().impl()


BACKEND = TritonBackend()
