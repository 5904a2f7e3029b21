"""The reference backend: SPEC.md as plain float64 PyTorch. The oracle every backend is tested against."""
from ..backend import Backend
from ..platforms import Platform


class ReferenceBackend(Backend):
    name = "reference"
    module = "portable_attn.reference.ops"
    platforms = frozenset({Platform.CPU, Platform.CUDA, Platform.ROCM, Platform.XPU})
    description = "SPEC.md in float64 PyTorch; slow, exact, every dtype"


BACKEND = ReferenceBackend()
