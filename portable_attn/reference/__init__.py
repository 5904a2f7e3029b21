"""The reference backend: docs/spec.md as plain float64 PyTorch. The oracle every backend is tested against."""
from ..backend import Backend
from ..platforms import Platform


class ReferenceBackend(Backend):
    name = "reference"
    module = "portable_attn.reference.ops"
    platforms = frozenset(Platform)  # plain torch on the tensors' device (host tensors on a TPU machine)
    description = "docs/spec.md in float64 PyTorch; slow, exact, every dtype"


BACKEND = ReferenceBackend()
