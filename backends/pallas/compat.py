"""Version-sensitive JAX imports in one place (the API moves: pin one jax in CI and Dockerfile.tpu),
and the interpret switch every pallas_call of this backend takes."""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl  # noqa: F401  (re-exported)
from jax.experimental.pallas import tpu as pltpu  # noqa: F401  (re-exported)


@functools.cache
def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def interpret():
    """`interpret=` for pallas_call: Pallas' TPU interpret mode (simulated memory spaces and DMAs,
    out-of-bounds and race detection) where there is no TPU, else None (compiled for the TPU)."""
    return None if on_tpu() else pltpu.InterpretParams()


def is_tracer(x) -> bool:
    """True for a value being traced (jax.jit, vmap): its index values are unknown on the host."""
    return isinstance(x, jax.core.Tracer)


def splash():
    """JAX's own splash attention (kernel, mask) modules, for the tests' comparison."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask
    return kernel, mask
