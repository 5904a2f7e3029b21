"""Scratch buffers kept across calls: a fresh multi-MB allocation costs page faults on every call (glibc
hands big blocks back to the OS), which at decode sizes costs more than the work itself.

Each thread has its own buffers (calls on two threads never share one), one per (name, dtype), grown
to the largest size asked for; the least recently used go once they hold more than KEEP_BYTES. A
buffer is scratch within one call: nothing returned to a caller may alias it. Buffers are made outside
inference mode: one made inside it could not be written by a later call outside it.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

KEEP_BYTES = 1 << 26  # bytes of buffers each thread keeps (64 MiB); a bigger request gets a fresh tensor

_local = threading.local()


def buffer(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` and `dtype`, backed by the buffer kept for
    (`name`, `dtype`) when it fits in KEEP_BYTES."""
    n = math.prod(shape)
    size = n * dtype.itemsize
    if size > KEEP_BYTES:
        return torch.empty(shape, dtype=dtype)
    kept = _kept()
    key = (name, dtype)
    buf = kept.pop(key, None)
    if buf is None or buf.numel() < n:
        buf = None  # released before the bigger one is made
        _evict(kept, KEEP_BYTES - size)
        with torch.inference_mode(False):
            buf = torch.empty(n, dtype=dtype)
    kept[key] = buf  # most recently used last
    return buf[:n].view(shape)


def _kept() -> OrderedDict:
    if not hasattr(_local, "kept"):
        _local.kept = OrderedDict()
    return _local.kept


def _evict(kept: OrderedDict, room: int) -> None:
    """Drop the least recently used buffers until the rest hold at most `room` bytes."""
    while kept and sum(b.numel() * b.element_size() for b in kept.values()) > room:
        kept.popitem(last=False)
