"""Tensor parallelism: the heads (and the groups they read) that `shard_heads` gives each rank, run through
the op on that rank alone, equal the single-device op's heads, for head and group counts that do not
divide the world size (groups replicated). The ranks are computed one after another in this process: a
head-sharded op exchanges nothing (the layer's output projection reduces over ranks, outside the op)."""
import pytest
import torch
from torch.testing import assert_close

import portable_attn as pa
from portable_attn.distributed import shard_heads

T = 40
CU = torch.tensor([0, 13, 13, 40], dtype=torch.int32)


GEN = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("hq, hkv", [(8, 2), (6, 3), (4, 1)])
def test_attention_heads(world, hq, hkv):
    q, k, v = _randn(T, hq, 16), _randn(T, hkv, 16), _randn(T, hkv, 16)
    sinks = _randn(hq)
    kw = dict(cu_seqlens_q=CU, cu_seqlens_k=CU, causal=True, window_size=(7, 0))
    whole = pa.attention(q, k, v, sinks=sinks, **kw)
    for rank in range(world):
        s = shard_heads(hq, hkv, world, rank)
        mine = pa.attention(q[:, s.heads], k[:, s.groups], v[:, s.groups], sinks=sinks[s.heads], **kw)
        assert_close(mine, whole[:, s.heads], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_mamba2_mixer_heads(world):
    """Mamba-2's short conv over [x | B | C] then SSD, with 6 heads over 2 groups of B/C."""
    H, G, P, N, W = 6, 2, 4, 8, 4
    xbc, conv_w, conv_b = _randn(T, H * P + 2 * G * N), _randn(H * P + 2 * G * N, W), _randn(H * P + 2 * G * N)
    dt, A, D, dt_bias, z = _randn(T, H), -torch.rand(H), _randn(H), _randn(H), _randn(T, H, P)
    conv_init, ssm_init = _randn(3, H * P + 2 * G * N, W - 1), _randn(3, H, P, N)

    def mixer(xbc, conv_w, conv_b, conv_init, dt, A, D, dt_bias, z, ssm_init, h, g):
        xc, conv_fin = pa.causal_conv1d(xbc, conv_w, conv_b, activation="silu", cu_seqlens=CU,
                                        initial_state=conv_init, output_final_state=True)
        x, B, C = xc.split([h * P, g * N, g * N], dim=1)
        y, ssm_fin = pa.ssd(x.reshape(T, h, P), dt, A, B.reshape(T, g, N), C.reshape(T, g, N), D=D, z=z,
                            dt_bias=dt_bias, dt_softplus=True, cu_seqlens=CU, initial_state=ssm_init,
                            output_final_state=True)
        return y, conv_fin, ssm_fin

    y, conv_fin, ssm_fin = mixer(xbc, conv_w, conv_b, conv_init, dt, A, D, dt_bias, z, ssm_init, H, G)
    for rank in range(world):
        s = shard_heads(H, G, world, rank)
        ch = s.channels(("heads", P, H), ("groups", N, G), ("groups", N, G))
        h = s.heads.stop - s.heads.start
        mine = mixer(xbc[:, ch], conv_w[ch], conv_b[ch], conv_init[:, ch], dt[:, s.heads], A[s.heads], D[s.heads],
                     dt_bias[s.heads], z[:, s.heads], ssm_init[:, s.heads], h, len(s.groups))
        assert_close(mine[0], y[:, s.heads], rtol=1e-5, atol=1e-5)
        assert_close(mine[1], conv_fin[:, ch], rtol=0, atol=0)
        assert_close(mine[2], ssm_fin[:, s.heads], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gated_delta_rule_value_heads(world):
    """Qwen3-Next's layout: 6 value heads over 3 q/k heads (GVA), sharded by value head."""
    H, Hv, K, V = 3, 6, 8, 8
    q, k, v = _randn(T, H, K), _randn(T, H, K), _randn(T, Hv, V)
    g, beta, init = -torch.rand(T, Hv), torch.rand(T, Hv), _randn(3, Hv, K, V)
    kw = dict(cu_seqlens=CU, use_qk_l2norm=True, output_final_state=True)
    o, fin = pa.gated_delta_rule(q, k, v, g, beta, initial_state=init, **kw)
    for rank in range(world):
        s = shard_heads(Hv, H, world, rank)
        mo, mfin = pa.gated_delta_rule(q[:, s.groups], k[:, s.groups], v[:, s.heads], g[:, s.heads],
                                       beta[:, s.heads], initial_state=init[:, s.heads], **kw)
        assert_close(mo, o[:, s.heads], rtol=1e-5, atol=1e-5)
        assert_close(mfin, fin[:, s.heads], rtol=1e-5, atol=1e-5)


def test_uneven_heads_replicate_groups():
    # heads 0-3 of 9 (groups of 3 heads): 3 heads of group 0 and 1 of group 1 -> one group per head
    assert shard_heads(9, 3, 2, 0).groups.tolist() == [0, 0, 0, 1]
    assert shard_heads(8, 2, 4, 1).groups.tolist() == [0]                    # even: the group itself
    assert shard_heads(8, 2, 4, 1).heads == slice(2, 4)


@pytest.mark.parametrize("args, match", [((4, 3, 2, 0), "groups dividing heads"), ((2, 1, 4, 0), "every rank"),
                                         ((4, 1, 2, 2), "rank")])
def test_bad_shards_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        shard_heads(*args)


def test_channels_refuses_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        shard_heads(4, 2, 2, 0).channels(("values", 4, 4))
