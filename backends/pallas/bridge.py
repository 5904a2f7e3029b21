"""torch <-> jax for the torch API: tensors cross through DLPack (no copy where the layouts allow),
results come back as torch tensors, `out=` is written, and updated cache rows are copied back into the
caller's tensors in place."""
from __future__ import annotations

import jax
import numpy as np
import torch

from . import compat


def to_jax(x):
    """A torch tensor as a jax array on this process's device (the TPU, or the CPU in interpret mode);
    other values (None, floats, a BlockMask, which stays on the host) pass through."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()
    if x.dtype == torch.bool:
        a = jax.numpy.asarray(x.cpu().numpy())
    else:
        if x.dtype == torch.int64:  # jax runs without 64-bit ints; indices fit int32 (support.py)
            x = x.to(torch.int32)
        a = jax.dlpack.from_dlpack(x.contiguous())
    return jax.device_put(a, jax.devices()[0]) if compat.on_tpu() else a


def to_torch(a, device) -> torch.Tensor:
    """A jax array as a torch tensor on `device`."""
    a = jax.device_put(a, jax.devices("cpu")[0]) if compat.on_tpu() else a
    if a.size == 0:  # DLPack of an empty buffer is not portable: build it
        return torch.empty(a.shape, dtype=_TORCH[np.dtype(a.dtype).name], device=device)
    return torch.from_dlpack(a).to(device)


_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
          "bool": torch.bool}


def arguments(args: dict) -> dict:
    """The op's arguments for the jax functions: tensors converted, `out` dropped."""
    return {n: to_jax(x) for n, x in args.items() if n != "out"}


def result(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The output, written into `out` when one is given."""
    if out is None:
        return t
    out.copy_(t)
    return out


def copy_rows(cache: torch.Tensor, new, rows: torch.Tensor) -> None:
    """cache[rows] = new[rows] for the rows >= 0, in place (the other rows stay bit-identical)."""
    rows = rows[rows >= 0].long()
    if rows.numel():
        cache[rows] = to_torch(new, cache.device)[rows].to(cache.dtype)


def copy_slots(cache: torch.Tensor, new, slots: torch.Tensor) -> None:
    """The written slots of a paged cache [NB, BS, ...], in place through its own strides."""
    nb, bs = cache.shape[:2]
    slots = slots[(slots >= 0) & (slots < nb * bs)].long()
    if slots.numel():
        cache[slots // bs, slots % bs] = to_torch(new, cache.device)[slots // bs, slots % bs]
