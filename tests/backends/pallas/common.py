"""What the pallas attention tests share: numpy inputs, the jax functions' results beside the float64
reference (torch, backend="reference") on the same values."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

import portable_attn as pa
from portable_attn.conformance.tolerance import FLOOR

JAX = {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}


def arrays(rng, *shapes, dtype=torch.float32):
    """Random normal inputs as (torch tensors rounded to `dtype`, the same values as jax arrays)."""
    ts = [torch.from_numpy(rng.standard_normal(s)).to(dtype) for s in shapes]
    return ts, [jnp.asarray(t.double().numpy()).astype(JAX[dtype]) for t in ts]


def index(x):
    """An int32 index array as (torch, jax)."""
    x = np.asarray(x, np.int32)
    return torch.from_numpy(x), jnp.asarray(x)


def reference(op, *args, **kw):
    """(o, lse) of the float64 reference on torch inputs."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return getattr(pa, op)(*up, **kw, return_lse=True, backend="reference")


def check(got, ref, dtype=torch.float32, factor=3.0):
    """o within the dtype's floor (times `factor`, for accumulation order) and lse within 1e-4, both
    scaled by the magnitude; -inf lse exactly where the reference has it; no NaN."""
    o, lse = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in got)
    ro, rlse = ref[0].numpy(), ref[1].numpy()
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    tol = factor * max(FLOOR[dtype], 2e-3 if dtype != torch.float32 else 0) * max(1.0, np.abs(ro).max(initial=0))
    assert np.abs(o - ro).max(initial=0) <= tol, np.abs(o - ro).max()
    fin = np.isfinite(rlse)
    assert (np.isfinite(lse) == fin).all()
    assert (lse[~fin] == rlse[~fin]).all()
    if fin.any():
        assert np.abs(lse[fin] - rlse[fin]).max() <= 1e-4 * max(1.0, np.abs(rlse[fin]).max())
