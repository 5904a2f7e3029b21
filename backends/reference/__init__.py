"""The reference backend: docs/spec.md as plain float64 PyTorch. The oracle every backend is tested against."""
from portable_attn.backend import Backend
from portable_attn.platforms import Platform


class ReferenceBackend(Backend):
    name = "reference"
    module = "portable_attn.backends.reference.ops"
    platforms = frozenset(Platform)  # plain torch on the tensors' device (host tensors on a TPU machine)
    description = "docs/spec.md in float64 PyTorch; slow, exact, every dtype"


BACKEND = ReferenceBackend()
