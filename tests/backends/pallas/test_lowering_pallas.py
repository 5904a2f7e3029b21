"""Every kernel configuration the attention family can pick, lowered for the TPU on this CPU with
jax.export (which enforces the (8, 128) tiling that interpret mode does not): each row of the tile
table, with and without block masks, sinks, softcap and lse, packed and paged (in place and gathered),
decode tiles, the top-k kernel, in float32 and bfloat16."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from portable_attn.backends.pallas import attention, compat, paged, sparse, tuning
from portable_attn.masks import BlockMask

S = jax.ShapeDtypeStruct
I32 = jnp.int32


def lower(fn, *shapes):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes)


def configs(table, dtype):
    hq, hkv, d = 8, 2, 128
    mask = BlockMask.from_mask_mod(lambda s, h, p, j: (p - j).abs() < 300, 1024, (256, 256), num_heads=hq)
    att = functools.partial(attention.attention, table=table)
    pag = functools.partial(paged.paged_attention, table=table)
    q, k = S((512, hq, d), dtype), S((600, hkv, d), dtype)
    cu = S((3,), I32)
    yield "varlen_sinks_softcap_lse", lambda q, k, v, cq, ck, s: att(
        q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, softcap=30.0, sinks=s, softmax_scale=0.1,
        return_lse=True), (q, k, k, cu, cu, S((hq,), jnp.float32))
    yield "block_mask_window", lambda q, k, v: att(q, k, v, causal=True, window_size=(200, 0), block_mask=mask,
                                                   softmax_scale=0.1), (S((1024, hq, d), dtype), S((1024, hkv, d), dtype),
                                                                        S((1024, hkv, d), dtype))
    for bs, dim in ((16, 128), (128, 128), (5, 64)):   # pages read in place; a page gathered into tiles
        cache = S((64, bs, hkv, dim), dtype)
        yield f"paged_decode_bs{bs}_d{dim}", lambda q, kc, vc, bt, su: pag(
            q, kc, vc, bt, su, softmax_scale=0.1, return_lse=True), (
            S((4, hq, dim), dtype), cache, cache, S((4, 16), I32), S((4,), I32))
        yield f"paged_prefill_bs{bs}_d{dim}", lambda q, kc, vc, bt, su, cq: pag(
            q, kc, vc, bt, su, cu_seqlens_q=cq, softmax_scale=0.1), (
            S((300, hq, dim), dtype), cache, cache, S((2, 16), I32), S((2,), I32), cu)
    yield "topk", lambda q, k, v, i, cq, ck: sparse.sparse_attention(
        q, k, v, i, cu_seqlens_q=cq, cu_seqlens_k=ck, softmax_scale=0.1, return_lse=True, table=table), (
        S((40, hq, d), dtype), k, k, S((40, hkv, 64), I32), cu, cu)


CASES = [(gen, dt) for gen in tuning.ATTENTION for dt in ("float32", "bfloat16")]


@pytest.mark.parametrize("gen, dtype", CASES, ids=[f"{g}-{d}" for g, d in CASES])
def test_lowers_for_tpu(gen, dtype, monkeypatch):
    monkeypatch.setattr(compat, "interpret", lambda: None)      # compile for the TPU, not interpret
    for name, fn, shapes in configs(tuning.ATTENTION[gen], jnp.dtype(dtype)):
        exported = lower(fn, *shapes)
        assert "tpu_custom_call" in exported.mlir_module(), name


def test_a_bad_tile_is_refused_by_the_lowering(monkeypatch):
    """The check above can fail: a 4-row query tile breaks the TPU's tiling."""
    monkeypatch.setattr(compat, "interpret", lambda: None)
    bad = tuning.Attention(block_q=4, block_k=128, sparse_queries=8)
    q = S((64, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower(lambda q: attention.attention(q, q, q, softmax_scale=1.0, table=bad), q)
