"""What runs: the implementations of a case, and one (case, point, implementation) rebuilt from names in a
worker process."""
from __future__ import annotations

import dataclasses
import os

import torch

from portable_attn import registry
from portable_attn.platforms import platform_of

from . import cases
from .impls import Impl, backend
from .peers import PEERS


@dataclasses.dataclass(frozen=True)
class Spec:
    case: str
    point: int
    impl: str
    quick: bool
    device: str


def default_backends(device: str) -> list[str]:
    """Every backend that can run on `device` here, except the (slow) reference."""
    platform = platform_of(torch.empty(0, device=device))
    return [name for name, b in registry.backends().items()
            if name != "reference" and b.available() is None and b.serves(platform) is None]


def default_threads(device: str, quick: bool) -> tuple[int, ...]:
    """CPU full runs: 1 and 2 threads (how each case scales); otherwise torch's current count."""
    if device != "cpu" or quick or (os.cpu_count() or 1) < 2:
        return (torch.get_num_threads(),)
    return (1, 2)


def impls_for(case: cases.Case, backends, peers: bool) -> list[Impl]:
    return [backend(n, case.op) for n in backends] + ([PEERS[p] for p in case.peers] if peers else [])


def materialize(spec: Spec):
    """(case, point, op arguments, implementation) of `spec`, inputs built afresh (same seed, same values)."""
    case = cases.named(spec.quick)[spec.case]
    point = case.points[spec.point]
    impl = PEERS[spec.impl] if spec.impl in case.peers else backend(spec.impl, case.op)
    return case, point, case.make(point.sizes, spec.device), impl
