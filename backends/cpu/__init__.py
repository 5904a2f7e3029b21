"""The cpu backend: fast PyTorch on the CPU; the default there. Work follows the visible pattern."""
from portable_attn.backend import Backend
from portable_attn.platforms import Platform


class CpuBackend(Backend):
    name = "cpu"
    module = "portable_attn.backends.cpu.ops"
    platforms = frozenset({Platform.CPU})
    description = ("attention over visible blocks (prefill, block masks and decode compiled), recurrences token by "
                   "token and conv1d compiled on first use (chunked without a compiler); "
                   "float32/16/bf16")
    limits = "float64 (use reference)"
    float64 = False
    checks_values = frozenset({"paged_attention"})  # decode.cpp checks the block ids and key counts it reads


BACKEND = CpuBackend()
