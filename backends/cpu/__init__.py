"""The cpu backend: fast PyTorch on the CPU; the default there. Work follows the visible pattern."""
import torch

from portable_attn.backend import Backend
from portable_attn.platforms import Platform


class CpuBackend(Backend):
    name = "cpu"
    module = "portable_attn.backends.cpu.ops"
    platforms = frozenset({Platform.CPU})
    description = "tiled attention over visible blocks, chunked recurrences; float32/16/bf16"
    limits = "float64 (use reference)"

    def supports(self, call):
        if call.dtype == torch.float64:
            return "float64 is the reference's job (use backend='reference')"
        return super().supports(call)


BACKEND = CpuBackend()
