"""How the reference computes: exactly (float64), or emulating a low-precision kernel.

The conformance tolerance compares a backend's error with the error the reference algorithm makes
when its matrix-product operands are rounded to the activation dtype while states and accumulators
stay float32, as a tensor-core kernel does. Reference code routes every product through `mm`.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_LOWP: contextvars.ContextVar = contextvars.ContextVar("portable_attn_reference_lowp", default=None)


@contextlib.contextmanager
def emulate(dtype: torch.dtype):
    """Within this block the reference computes like a `dtype` kernel with float32 accumulation."""
    token = _LOWP.set(dtype)
    try:
        yield
    finally:
        _LOWP.reset(token)


def compute_dtype() -> torch.dtype:
    return torch.float64 if _LOWP.get() is None else torch.float32


def up(x: torch.Tensor | None) -> torch.Tensor | None:
    """An input in the compute dtype, contiguous: torch's elementwise kernels round differently on strided
    operands (silu on a strided float64 z differed by an ulp on an AVX2 host), and the oracle's bits must not
    depend on the caller's strides."""
    return None if x is None else x.to(compute_dtype()).contiguous()


def rnd(x: torch.Tensor) -> torch.Tensor:
    """A matrix-product operand: rounded to the emulated dtype (identity when exact)."""
    low = _LOWP.get()
    return x if low is None else x.to(low).to(torch.float32)


def mm(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """einsum with operands rounded as a low-precision kernel would round them."""
    return torch.einsum(equation, *(rnd(o) for o in operands))
