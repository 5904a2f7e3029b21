"""Inputs are drawn in NumPy float64 and converted to each backend's array type and dtype here."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..masks import BlockMask

# Argument roles decide the dtype a value takes in a call.
ACTIVATIONS = {"q", "k", "v", "x", "z", "B", "C", "k_cache", "v_cache", "weight", "bias", "o_a", "o_b"}
PARAMS = {"g", "beta", "dt", "A", "D", "dt_bias", "sinks", "lse_a", "lse_b"}   # float32 whatever the activations
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


def heads_major(inputs: dict) -> dict:
    """Paged caches [NB, BS, Hkv, D] as views of [NB, Hkv, BS, D] storage (the layout IPEX keeps)."""
    return inputs | {n: inputs[n].transpose(1, 2).contiguous().transpose(1, 2)
                     for n in ("k_cache", "v_cache") if n in inputs}


# ---- strided views: every tensor argument inside a larger buffer of garbage ---------------------

LAYOUTS = ("gaps", "transposed")
_JUNK_INT = 2 ** 31 - 1  # an index no tensor of the suite reaches


def garbage(dtype: torch.dtype):
    """What the memory around a view holds: NaN for floats, out-of-range junk for ints."""
    if dtype.is_floating_point:
        return float("nan")
    return True if dtype == torch.bool else _JUNK_INT


def _embed(x: torch.Tensor, layout: str, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): `x`'s values in a view of a larger buffer holding `fill` everywhere else.

    "gaps": one element of padding ahead of every axis and every other element of the last axis
    (no axis has its natural stride); "transposed": the axes stored in reverse order, padded likewise.
    """
    if x.dim() == 0:
        return x.clone(), x.clone()
    if layout == "gaps":
        buf = torch.full([n + 1 for n in x.shape[:-1]] + [2 * x.shape[-1] + 1], fill, dtype=x.dtype, device=x.device)
        view = buf[(slice(1, None),) * (x.dim() - 1) + (slice(1, None, 2),)]
    elif layout == "transposed":
        buf = torch.full([n + 1 for n in reversed(x.shape)], fill, dtype=x.dtype, device=x.device)
        view = buf[(slice(1, None),) * x.dim()].permute(*reversed(range(x.dim())))
    else:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    view.copy_(x)
    return view, buf


@dataclasses.dataclass
class Gapped:
    """A view handed to a backend and what must not change around it."""
    buffer: torch.Tensor
    before: torch.Tensor   # the buffer's bits before the call
    outside: torch.Tensor  # bool, like buffer: True where the view does not reach


def strided(inputs: dict, layout: str) -> tuple[dict, dict[str, Gapped]]:
    """Every tensor argument as a non-contiguous view with the same values, garbage in between."""
    views, gaps = dict(inputs), {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            views[name], buf = _embed(value, layout, garbage(value.dtype))
            _, inside = _embed(torch.ones_like(value, dtype=torch.bool), layout, False)
            gaps[name] = Gapped(buf, buf.clone(), ~inside)
    return views, gaps


def written_outside(gaps: dict[str, Gapped]) -> str:
    """The memory around each view must be bit-identical after the call."""
    bad = [n for n, g in gaps.items() if not same_bits(g.buffer[g.outside], g.before[g.outside])]
    return f"wrote outside the view of: {', '.join(bad)}" if bad else ""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), which `torch.equal` is not for NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(ints), b.contiguous().view(ints)
    return torch.equal(a, b)
