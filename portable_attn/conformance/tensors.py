"""Inputs are drawn in NumPy float64 and converted to each backend's array type and dtype here."""
from __future__ import annotations

import numpy as np
import torch

from ..masks import BlockMask

# Argument roles decide the dtype a value takes in a call.
ACTIVATIONS = {"q", "k", "v", "x", "z", "B", "C", "k_cache", "v_cache", "weight", "bias"}
PARAMS = {"g", "beta", "dt", "A", "D", "dt_bias", "sinks"}   # float32 whatever the activations
STATES = {"initial_state", "state"}                          # float32 unless the case says otherwise
INDICES = {"cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "block_table", "seqused_k", "indices",
           "state_indices", "slot_mapping"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def to_torch(inputs: dict, dtype: torch.dtype, device, state_dtype: torch.dtype | None = None) -> dict:
    """NumPy inputs -> torch tensors: activations in `dtype`, params float32, states `state_dtype`."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, BlockMask):
            out[name] = value.to(device)
        elif isinstance(value, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(value)).to(device)
            if name in INDICES:
                t = t.to(torch.int32)
            elif value.dtype == np.bool_:
                pass
            elif name in ACTIVATIONS:
                t = t.to(dtype)
            elif name in STATES:
                t = t.to(state_dtype or torch.float32)
            elif name in PARAMS:
                t = t.to(torch.float32 if dtype != torch.float64 else torch.float64)
            else:
                raise KeyError(f"conformance: no dtype role for argument {name!r}")
            out[name] = t
        else:
            out[name] = value
    return out


def upcast(inputs: dict) -> dict:
    """The same values in float64 (what the exact oracle reads)."""
    return {n: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for n, v in inputs.items()}


def clone(inputs: dict) -> dict:
    """A deep copy, so in-place updates of one call do not leak into the next."""
    return {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in inputs.items()}


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """A fresh output buffer filled with NaN: every element must be written by the op."""
    return torch.full_like(x, float("nan"))
