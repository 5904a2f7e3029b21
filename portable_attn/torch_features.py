"""Feature probes of the installed torch, where releases differ in what a kernel computes (never version
tables): each runs once per process, on tiny inputs, and says what it checked."""
from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_flash_shares_kv_heads() -> bool:
    """Whether the CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`) maps query head h to kv
    head h // group itself when k, v have fewer heads (GQA). torch 2.13 does; torch 2.8 reads kv head h
    instead, past the tensor, with no error. The probe's k, v are the first heads of larger buffers, so
    such reads land in memory it owns; the answer is whether the result equals the repeated-heads one."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 32, 16, generator=g)
    k, v = (torch.randn(1, 4, 32, 16, generator=g)[:, :2] for _ in range(2))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    shared, _ = flash(q, k, v, 0.0, True)
    repeated, _ = flash(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.0, True)
    return torch.equal(shared, repeated)
