"""The pallas flash kernel beside JAX's own splash attention, both in Pallas' TPU interpret mode, on the
same inputs, for the masks both take: causal, local windows (splash's LocalMask (left, right) is our
window_size), chunked causal (our BlockMask.chunked_local with causal=True), and an element mask
(splash's NumpyMask, our BlockMask.from_mask_mod), with softcap."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from portable_attn.backends.pallas import attention, compat
from portable_attn.masks import BlockMask

T, H, D = 256, 2, 128
kernel, masks = compat.splash()


def splash(mask, q, k, v, softcap=None):
    blocks = kernel.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128)
    fn = kernel.make_splash_mha_single_device(masks.MultiHeadMask([mask] * H), block_sizes=blocks,
                                              attn_logits_soft_cap=softcap)
    with compat.pltpu.force_tpu_interpret_mode():
        return fn(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)).transpose(1, 0, 2)


def chunk_pred(size):
    return lambda s, h, p, j: (p // size == j // size) & (j <= p)


ELEMENT = np.random.default_rng(5).random((T, T)) < 0.7
ELEMENT[:, 0] = True


@pytest.mark.parametrize("name", ["causal", "local", "chunked", "numpy"])
def test_matches_splash(name):
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((T, H, D)), jnp.float32) for _ in range(3))
    ours = dict(causal=True)
    softcap = None
    if name == "causal":
        theirs = masks.CausalMask((T, T))
    elif name == "local":
        theirs = masks.LocalMask((T, T), window_size=(40, 7), offset=0)
        ours = dict(window_size=(40, 7))
    elif name == "chunked":
        theirs = masks.ChunkedCausalMask((T, T), chunk_size=64)
        ours = dict(causal=True, block_mask=BlockMask.from_mask_mod(chunk_pred(64), T, (64, 64)))
    else:
        theirs = masks.NumpyMask(ELEMENT)
        elem = torch.from_numpy(ELEMENT)
        ours = dict(block_mask=BlockMask.from_mask_mod(lambda s, h, p, j: elem[p, j], T, (32, 64)))
        softcap = 8.0
    want = splash(theirs, q, k, v, softcap)
    got = attention.attention(q, k, v, softmax_scale=1.0, softcap=softcap or 0.0, **ours)
    assert float(jnp.abs(got - want).max()) <= 2e-5 * max(1.0, float(jnp.abs(want).max()))
