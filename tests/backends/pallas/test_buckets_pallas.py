"""Shape buckets (backends/pallas/buckets.py): one process serving ragged batches compiles a bounded set
of executables (counted by JAX's own compile event, every XLA compilation included), and padding never
reaches a result."""
from __future__ import annotations

import collections
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import portable_attn as pa
import portable_attn.jax as pj
from portable_attn.backends.pallas import buckets

from .common import check, reference

COMPILE = "/jax/core/compile/backend_compile_duration"   # jax._src.dispatch.BACKEND_COMPILE_EVENT


@contextlib.contextmanager
def compiles():
    """A Counter of the XLA compilations in the block, by function name."""
    seen = collections.Counter()

    def listen(event, duration, **kw):
        if event == COMPILE:
            seen[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def cu(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def varlen_attention(rng):
    """1-4 sequences of 0-8 queries and up to 8 more keys; Hq 2, Hkv 1, D 8."""
    lq = rng.integers(0, 9, int(rng.integers(1, 5)))
    lk = lq + rng.integers(0, 9, lq.shape[0])
    q, k, v = (torch.from_numpy(rng.standard_normal((int(n), h, 8))).float()
               for n, h in ((lq.sum(), 2), (lk.sum(), 1), (lk.sum(), 1)))
    kw = dict(cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), causal=True)
    o = pa.attention(q, k, v, **kw, return_lse=True, out=torch.full(q.shape, float("nan")), backend="pallas")
    check((o[0].numpy(), o[1].numpy()), reference("attention", q, k, v, **kw))


def paged_decode(rng):
    """A decode batch of 1-8 sequences over a fixed cache of 6 pages of 8 slots."""
    bsz = int(rng.integers(1, 9))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    kc, vc = torch.randn(6, 8, 1, 8, generator=gen), torch.randn(6, 8, 1, 8, generator=gen)
    table = torch.from_numpy(rng.integers(0, 6, (bsz, 3))).int()
    used = torch.from_numpy(rng.integers(0, 25, bsz)).int()
    q = torch.randn(bsz, 2, 8, generator=gen)
    o = pa.paged_attention(q, kc, vc, table, used, return_lse=True, backend="pallas")
    check((o[0].numpy(), o[1].numpy()), reference("paged_attention", q, kc, vc, table, used))


def recurrent(rng):
    """gated_delta_rule over 1-3 sequences of 0-20 tokens from a state cache of 4 rows."""
    lens = rng.integers(0, 21, int(rng.integers(1, 4)))
    n, s = int(lens.sum()), lens.shape[0]
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q, k = torch.randn(n, 1, 8, generator=gen), torch.randn(n, 1, 8, generator=gen)
    v, g = torch.randn(n, 1, 8, generator=gen), -torch.rand(n, 1, generator=gen)
    beta = torch.rand(n, 1, generator=gen)
    cache = torch.randn(4, 1, 8, 8, generator=gen)
    rows = torch.from_numpy(rng.permutation(4)[:s]).int()
    want_cache = cache.clone()
    kw = dict(cu_seqlens=cu(lens), state_indices=rows, use_qk_l2norm=True)
    y, _ = pa.gated_delta_rule(q, k, v, g, beta, initial_state=cache, **kw, backend="pallas")
    wy, _ = pa.gated_delta_rule(*(x.double() for x in (q, k, v, g, beta)), initial_state=want_cache.double(), **kw,
                                backend="reference")
    torch.testing.assert_close(y.double(), wy, rtol=2e-5, atol=2e-5)


CASES = (varlen_attention,) * 4 + (paged_decode, recurrent)
CALLS = 24   # a round


def test_ragged_batches_compile_a_bounded_set():
    """Two rounds of the same mix of random ragged calls (varlen attention, paged decode, the delta rule
    from a state cache), nearly every call a new exact shape, each result against the reference: the
    first round compiles what its buckets need, the second, with new random lengths, little more."""
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(2):
        with compiles() as seen:
            for i in range(CALLS):
                CASES[i % len(CASES)](rng)
        rounds.append(seen)
    first, second = (sum(r.values()) for r in rounds)
    # exact shapes compile every new one (each call here: the kernel, its work list and a dozen small XLA
    # pieces, about 13 * CALLS); measured with buckets: 55 then 4 (48 calls a round: 59 then 9)
    assert first <= 3 * CALLS, rounds[0].most_common(10)
    assert second <= CALLS // 4, rounds[1].most_common(10)


def test_bucket_ladder():
    """Powers of two up to 256 (at least the minimum), then four sizes an octave: never below n, under
    25% padding above 256, and a bucket is its own bucket."""
    assert [buckets.size(n) for n in (0, 1, 2, 3, 5, 129, 256)] == [1, 1, 2, 4, 8, 256, 256]
    assert buckets.size(3, 8) == 8
    for n in range(1, 5000):
        b = buckets.size(n)
        assert b >= n and buckets.size(b) == b
        assert n <= 256 or b < 1.25 * n + 1
    assert len({buckets.size(n) for n in range(257, 4097)}) == 16


@pytest.mark.parametrize("op", ["attention", "linear_attention_step"])
def test_front_pads_and_trims(op):
    """The JAX front pads ragged inputs to buckets and cuts the outputs back to the caller's shapes."""
    rng = np.random.default_rng(1)
    if op == "attention":
        q = jnp.asarray(rng.standard_normal((11, 2, 8)), jnp.float32)
        o, lse = pj.attention(q, q, q, causal=True, return_lse=True)
        assert o.shape == (11, 2, 8) and lse.shape == (2, 11)
        t = torch.from_numpy(np.array(q))
        check((np.asarray(o), np.asarray(lse)), reference("attention", t, t, t, causal=True))
        return
    q = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    before = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    y, new = pj.linear_attention_step(q, q, q, state=jnp.asarray(before), state_indices=jnp.asarray([4, -1, 0], jnp.int32))
    assert y.shape == (3, 2, 8) and new.shape == (5, 2, 8, 8)
    assert np.array_equal(np.asarray(new)[1:4], before[1:4])
