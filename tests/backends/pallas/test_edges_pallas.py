"""Edge inputs of the pallas backend through the torch API and the JAX front: top-k of 0, memory a query
cannot see holding NaN/Inf (slots past seqused_k, unused pages, keys outside every query's window, -1
sparse slots, unlisted state rows), and arrays that are not JAX arrays given to the JAX front."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import portable_attn as pa
import portable_attn.jax as pj

from .common import check, reference

NAN, INF = float("nan"), float("inf")


def poisoned_out(shape):
    return torch.full(shape, NAN)


@pytest.mark.parametrize("sinks", [False, True])
def test_sparse_topk_zero_sees_nothing(sinks):
    """topk = 0: o = 0, lse = -inf, or the sink (docs/spec.md "Empty sizes")."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 4, 16, generator=gen), torch.randn(7, 2, 16, generator=gen),
               torch.randn(7, 2, 8, generator=gen))
    idx = torch.zeros(5, 2, 0, dtype=torch.int32)
    kw = dict(sinks=torch.randn(4, generator=gen)) if sinks else {}
    out = poisoned_out((5, 4, 8))
    o, lse = pa.sparse_attention(q, k, v, idx, return_lse=True, out=out, backend="pallas", **kw)
    assert o is out and torch.equal(o, torch.zeros(5, 4, 8))
    want = kw["sinks"][:, None].expand(4, 5) if sinks else torch.full((4, 5), -INF)
    assert torch.equal(lse, want)
    check((o.numpy(), lse.numpy()), reference("sparse_attention", q, k, v, idx, **kw))


def _paged_case(d, bs, gen):
    """A cache of 8 pages, two sequences using 3 and 2 of them partly, the others unused."""
    kc, vc = torch.randn(8, bs, 2, d, generator=gen), torch.randn(8, bs, 2, d, generator=gen)
    table = torch.tensor([[3, 1, 6], [0, 5, 2]], dtype=torch.int32)
    used = torch.tensor([2 * bs + 1, bs - 2], dtype=torch.int32)
    return kc, vc, table, used


@pytest.mark.parametrize("d, bs", [(128, 8), (16, 5)], ids=["pages_in_place", "pages_gathered"])
def test_paged_memory_past_seqused_never_reaches_outputs(d, bs):
    """NaN/Inf in slots at or past seqused_k, in table entries past the used blocks and in pages no
    sequence uses: decode and chunked prefill equal the reference on the clean cache."""
    gen = torch.Generator().manual_seed(1)
    kc, vc, table, used = _paged_case(d, bs, gen)
    q = torch.randn(2, 4, d, generator=gen)
    cq = torch.tensor([0, 3, 5], dtype=torch.int32)
    q2 = torch.randn(5, 4, d, generator=gen)
    want = [reference("paged_attention", q, kc, vc, table, used),
            reference("paged_attention", q2, kc, vc, table, used, cu_seqlens_q=cq)]
    for cache, bad in ((kc, NAN), (vc, INF)):
        cache[6, 1:] = bad                    # sequence 0's third page past its last key
        cache[2] = bad                        # sequence 1's third table entry, unused
        cache[5, bs - 2:] = bad               # sequence 1's second page past its last key
        cache[[4, 7]] = bad                   # pages nobody uses
    got = [pa.paged_attention(q, kc, vc, table, used, return_lse=True, out=poisoned_out((2, 4, d)),
                              backend="pallas"),
           pa.paged_attention(q2, kc, vc, table, used, cu_seqlens_q=cq, return_lse=True,
                              out=poisoned_out((5, 4, d)), backend="pallas")]
    for (o, lse), ref in zip(got, want):
        check((o.numpy(), lse.numpy()), ref)


def test_keys_outside_every_window_never_reach_outputs():
    """Packed attention, a sliding window: keys no query of a sequence can see hold NaN/Inf."""
    gen = torch.Generator().manual_seed(2)
    lq, lk = [3, 4], [40, 9]
    q = torch.randn(7, 2, 16, generator=gen)
    k, v = torch.randn(49, 1, 16, generator=gen), torch.randn(49, 1, 16, generator=gen)
    cq, ck = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 40, 49], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, window_size=(4, 0))
    want = reference("attention", q, k, v, **kw)
    k[:33], v[:33] = NAN, INF                     # sequence 0: its queries see keys 33..39 only
    v[40:41] = NAN                                # sequence 1: keys 1.. only
    o, lse = pa.attention(q, k, v, return_lse=True, out=poisoned_out((7, 2, 16)), backend="pallas", **kw)
    check((o.numpy(), lse.numpy()), want)


def test_unlisted_sparse_keys_never_reach_outputs():
    """-1 slots and positions no query lists hold NaN/Inf."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, 16, generator=gen), torch.randn(10, 1, 16, generator=gen),
               torch.randn(10, 1, 16, generator=gen))
    idx = torch.tensor([[[2, -1, 5]], [[-1, -1, -1]], [[7, 2, -1]], [[5, 7, 2]]], dtype=torch.int32)
    want = reference("sparse_attention", q, k, v, idx)
    unlisted = [0, 1, 3, 4, 6, 8, 9]
    k[unlisted], v[unlisted] = NAN, INF
    o, lse = pa.sparse_attention(q, k, v, idx, return_lse=True, out=poisoned_out((4, 2, 16)), backend="pallas")
    check((o.numpy(), lse.numpy()), want)


@pytest.mark.parametrize("op", ["linear_attention", "linear_attention_step"])
def test_unlisted_state_rows_never_reach_outputs(op):
    """NaN in cache rows a call does not list, in rows of sequences with has_initial_state False and of
    -1 sequences: outputs equal the reference on a clean cache, unlisted rows keep their bits."""
    gen = torch.Generator().manual_seed(4)
    step = op.endswith("_step")
    n = 3
    t = n if step else 10
    q, k, v = (torch.randn(t, 2, 8, generator=gen), torch.randn(t, 2, 8, generator=gen) * 0.3,
               torch.randn(t, 2, 4, generator=gen))
    g = -torch.rand(t, 2, generator=gen)
    cache = torch.randn(6, 2, 8, 4, generator=gen)
    rows = torch.tensor([4, -1, 1], dtype=torch.int32)
    kw = dict(state_indices=rows) if step else dict(state_indices=rows, cu_seqlens=torch.tensor(
        [0, 4, 4, 10], dtype=torch.int32), has_initial_state=torch.tensor([True, True, False]))
    ref_cache = cache.clone()
    if not step:
        ref_cache[1] = 0                             # has_initial_state False: read as zero
        cache[1] = NAN                               # listed, but not read
    name = "state" if step else "initial_state"
    want = getattr(pa, op)(q, k, v, g=g, **{name: ref_cache}, **kw, backend="reference")
    cache[[0, 2, 3, 5]] = NAN                        # unlisted (and what the -1 would read first)
    got = getattr(pa, op)(q, k, v, g=g, **{name: cache}, **kw, out=poisoned_out((t, 2, 4)), backend="pallas")
    y, wy = (got, want) if step else (got[0], want[0])
    torch.testing.assert_close(y, wy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[[1, 4]], ref_cache[[1, 4]], rtol=1e-5, atol=1e-5)
    assert torch.isnan(cache[[0, 2, 3, 5]]).all()


def test_front_refuses_arrays_that_are_not_jax():
    """A torch tensor or a NumPy array for a tensor argument: TypeError naming the argument."""
    q = jnp.ones((4, 2, 8), jnp.float32)
    with pytest.raises(TypeError, match=r"q: expected a jax.Array, got torch.Tensor"):
        pj.attention(torch.ones(4, 2, 8), q, q)
    with pytest.raises(TypeError, match=r"v: expected a jax.Array, got numpy.ndarray"):
        pj.attention(q, q, np.ones((4, 2, 8), np.float32))
    cu = np.array([0, 4], np.int32)
    with pytest.raises(TypeError, match=r"cu_seqlens_q: expected a jax.Array, got numpy.ndarray"):
        pj.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=jnp.asarray(cu))
    state = torch.zeros(2, 2, 8, 8)
    with pytest.raises(TypeError, match=r"state: expected a jax.Array"):
        pj.linear_attention_step(q[:2], q[:2], q[:2], state=state)
