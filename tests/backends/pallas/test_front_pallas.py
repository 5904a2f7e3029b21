"""The JAX front (portable_attn.jax) eager and under jax.jit, and the torch API reaching pallas through
the DLPack bridge: out= written, strided caches updated in place, untouched rows bit-identical."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import portable_attn as pa
import portable_attn.jax as pj
from portable_attn.backends.pallas import ops, plan

from .common import arrays, check, index, reference


def _varlen(rng):
    (q, k, v), (jq, jk, jv) = arrays(rng, (20, 4, 32), (30, 2, 32), (30, 2, 32))
    return (q, k, v), (jq, jk, jv), index([0, 8, 20]), index([0, 10, 30])


def test_attention_under_jit_matches_eager_and_reference():
    (q, k, v), (jq, jk, jv), (tcq, jcq), (tck, jck) = _varlen(np.random.default_rng(0))
    f = jax.jit(lambda *a: pj.attention(*a[:3], cu_seqlens_q=a[3], cu_seqlens_k=a[4], causal=True,
                                        window_size=(6, 0), return_lse=True))
    got = f(jq, jk, jv, jcq, jck)
    check(got, reference("attention", q, k, v, cu_seqlens_q=tcq, cu_seqlens_k=tck, causal=True, window_size=(6, 0)))
    eager = pj.attention(jq, jk, jv, cu_seqlens_q=jcq, cu_seqlens_k=jck, causal=True, window_size=(6, 0),
                         return_lse=True)
    np.testing.assert_allclose(np.asarray(eager[0]), np.asarray(got[0]), atol=1e-6)


def test_short_sequences_straddling_query_tiles_under_jit():
    """Sequences whose few queries straddle a tile boundary need two query tiles each; under jax.jit no bucket
    padding hides a short count (this layout once returned wrong rows for its last sequence)."""
    rng = np.random.default_rng(3)
    cq, ck = [0, 6, 12, 18, 24, 30, 36, 36], [0, 5, 83, 83, 85, 87, 122, 124]
    (q, k, v), (jq, jk, jv) = arrays(rng, (36, 4, 16), (124, 2, 16), (124, 2, 16))
    (tcq, jcq), (tck, jck) = index(cq), index(ck)
    got = jax.jit(lambda *a: pj.attention(*a[:3], cu_seqlens_q=a[3], cu_seqlens_k=a[4], return_lse=True))(
        jq, jk, jv, jcq, jck)
    check(got, reference("attention", q, k, v, cu_seqlens_q=tcq, cu_seqlens_k=tck))


@pytest.mark.parametrize("bq", [1, 8, 40, 64])
def test_query_bound_covers_every_layout(bq):
    """plan.query_bound against the tiles plan.work lays out, on random ragged layouts (lq > lk included)."""
    rng = np.random.default_rng(bq)
    for _ in range(200):
        nseq = int(rng.integers(1, 9))
        lq = rng.integers(0, 3 * bq + 2, nseq)
        lk = rng.integers(0, 4 * bq, nseq)
        first, ntile = plan._first_last(jnp.asarray(lq), jnp.asarray(lk), bq)
        assert int(ntile.sum()) <= plan.query_bound(int(lq.sum()), nseq, bq), (lq, lk)


def test_paged_and_sparse_under_jit():
    rng = np.random.default_rng(1)
    (q, kc, vc), (jq, jkc, jvc) = arrays(rng, (3, 4, 32), (6, 8, 2, 32), (6, 8, 2, 32))
    (tt, jt), (ts, js) = index([[5, 0, 1], [2, 4, 3], [1, 1, 1]]), index([20, 17, 0])
    got = jax.jit(lambda *a: pj.paged_attention(*a, return_lse=True))(jq, jkc, jvc, jt, js)
    check(got, reference("paged_attention", q, kc, vc, tt, ts))
    (k, v), (jk, jv) = arrays(rng, (12, 2, 32), (12, 2, 32))
    ti, ji = index(np.stack([rng.permutation(12)[:5] for _ in range(6)]).reshape(3, 2, 5))
    got = jax.jit(lambda *a: pj.sparse_attention(*a, return_lse=True))(jq, jk, jv, ji)
    check(got, reference("sparse_attention", q, k, v, ti))


def test_write_kv_cache_returns_the_caches():
    rng = np.random.default_rng(2)
    (k, kc), (jk, jkc) = arrays(rng, (5, 2, 16), (4, 3, 2, 16))
    slots = jnp.array([7, -1, 0, 11, 4], jnp.int32)
    new_k, new_v = jax.jit(pj.write_kv_cache)(jk, jk, jkc, jkc + 1, slots)
    want = kc.clone().flatten(0, 1)
    want[[7, 0, 11, 4]] = k[[0, 2, 3, 4]]
    assert np.array_equal(np.asarray(new_k).reshape(12, 2, 16), want.numpy())
    assert new_v.shape == jkc.shape


def test_checks_name_the_argument_and_skip_index_values_under_jit():
    (q, k, v), (jq, jk, jv), _, (tck, jck) = _varlen(np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"k: axis 2 must be the head dim D of q = 32, got shape \(30, 2, 16\)"):
        pj.attention(jq, jk[:, :, :16], jv)
    bad = jnp.array([0, 9, 21], jnp.int32)                   # last entry != Tq
    with pytest.raises(ValueError, match="cu_seqlens_q: last entry must be the token count 20, got 21"):
        pj.attention(jq, jk, jv, cu_seqlens_q=bad, cu_seqlens_k=jck)
    o = jax.jit(lambda cq: pj.attention(jq, jk, jv, cu_seqlens_q=cq, cu_seqlens_k=jck))(bad)   # not checked
    assert o.shape == (20, 4, 32)
    with pytest.raises(pa.NotSupported, match="float64"):
        pa.attention(q.double(), k.double(), v.double(), backend="pallas")


def test_torch_bridge_writes_out_and_strided_caches():
    rng = np.random.default_rng(4)
    (q, k, v), *_ = _varlen(rng)
    out = torch.full((20, 4, 32), float("nan"))
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)     # strided input
    o, lse = pa.attention(qt, k[:20], v[:20], causal=True, out=out, return_lse=True, backend="pallas")
    assert o is out
    check((o.numpy(), lse.numpy()), reference("attention", q, k[:20], v[:20], causal=True))
    kv = torch.randn(4, 2, 3, 2, 16)                        # k_cache, v_cache: views of one buffer
    before = kv.clone()
    slots = torch.tensor([7, -1, 0], dtype=torch.int64)
    x = torch.randn(3, 2, 16)
    pa.write_kv_cache(x, x + 1, kv[:, 0], kv[:, 1], slots, backend="pallas")
    assert torch.equal(kv[2, 0, 1], x[0]) and torch.equal(kv[0, 1, 0], x[2] + 1)
    changed = (kv != before).flatten(2).any(-1)
    assert changed.sum() == 4                               # 2 tokens x (k, v), nothing else


def test_bridge_copies_listed_cache_rows_only():
    """The recurrent convention (y, whole updated cache): listed rows are copied back in place, the
    others stay bit-identical, final_state is the cache itself; without a cache, the new final state."""
    cache = torch.randn(5, 2, 3)
    before = cache.clone()
    new = jnp.asarray(np.full((5, 2, 3), 7.0, np.float32))

    def fake(**a):
        return jnp.ones((4, 2)), new if a["state_indices"] is not None else jnp.zeros((2, 2, 3))

    args = dict(x=torch.zeros(4, 2), initial_state=cache, state_indices=torch.tensor([3, -1], dtype=torch.int32),
                has_initial_state=None, cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32),
                output_final_state=True, out=torch.full((4, 2), float("nan")))
    out, final = ops._sequence("causal_conv1d", fake, args)
    assert final is cache and out is args["out"] and torch.equal(out, torch.ones(4, 2))
    assert torch.equal(cache[3], torch.full((2, 3), 7.0))
    assert torch.equal(cache[[0, 1, 2, 4]], before[[0, 1, 2, 4]])
    out, final = ops._sequence("causal_conv1d", fake, args | dict(initial_state=None, state_indices=None, out=None))
    assert final.dtype == torch.float32 and final.shape == (2, 2, 3)
    state = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    y = ops._step("causal_conv1d_step", lambda **a: (jnp.ones((1, 2)), new),
                  dict(x=torch.zeros(1, 2), state=state, out=None, state_indices=torch.tensor([4], dtype=torch.int32)))
    assert torch.equal(state[4], torch.full((2, 3), 7.0, dtype=torch.bfloat16)) and y.shape == (1, 2)


def test_large_recurrent_states_are_refused_with_the_reason():
    """A state whose K or V (SSD: N or P) is above 512 does not fit the chunk kernel's VMEM: refused."""
    q = torch.randn(4, 1, 520)
    v = torch.randn(4, 1, 16)
    with pytest.raises(pa.NotSupported, match="above 512"):
        pa.linear_attention(q, q, v, backend="pallas")
    x, dt, A, B = torch.randn(4, 1, 600), torch.rand(4, 1), -torch.rand(1), torch.randn(4, 1, 16)
    with pytest.raises(pa.NotSupported, match="above 512"):
        pa.ssd(x, dt, A, B, B, backend="pallas")
