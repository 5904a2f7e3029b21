"""The cpu backend's recurrent ops against the reference, where conformance does not reach: many chunks
and blocks with ragged tails, chunk and block boundaries, strong decays, strided inputs and caches, large
step batches. Every test runs twice: on the compiled kernels (gated delta rule, SSD step, conv1d) and on
the torch paths they replace (the chunked forms). Inputs are random and never zero."""
from __future__ import annotations

import pytest
import torch

import portable_attn as pa
from portable_attn.backends.cpu import chunk
from tests.backends.compare import state_tail

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
C, BLOCK = chunk.CHUNK, chunk.BLOCK
SEQ_OPS = ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d")
TOKEN_ARGS = ("q", "k", "v", "g", "beta", "x", "dt", "B", "C", "z")


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("PORTABLE_ATTN_CPU_NATIVE", "0")
    return request.param


def randn(gen, *shape, scale=1.0, dtype=F32):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def neg(gen, lo, hi, *shape):
    """Log-decays in [-hi, -lo]."""
    return -(lo + (hi - lo) * torch.rand(shape, generator=gen))


# -log-decay per token; a full chunk of "below_span" / "above_span" spans just under / over chunk.SPAN
DECAYS = {"weak": (0.01, 0.4), "below_span": (1.6, 1.85), "above_span": (1.95, 2.1), "strong": (20.0, 40.0)}


def inputs(op, gen, T, *, dtype=F32, gate="head", decay="weak"):
    """Token and parameter inputs of `op` for T tokens (grouped heads wherever the op has them)."""
    lo, hi = DECAYS[decay]
    strong = decay == "strong"
    if op == "linear_attention":
        H, K, V = 2, 16, 12
        g = None if gate is None else neg(gen, lo, hi, T, H, *((K,) if gate == "key" else ()))
        return dict(q=randn(gen, T, H, K, dtype=dtype), k=randn(gen, T, H, K, scale=K ** -0.5, dtype=dtype),
                    v=randn(gen, T, H, V, dtype=dtype), g=g)
    if op == "gated_delta_rule":
        H, Hv, K, V = 1, 2, 16, 12
        return dict(q=randn(gen, T, H, K, dtype=dtype), k=randn(gen, T, H, K, dtype=dtype),
                    v=randn(gen, T, Hv, V, dtype=dtype), g=neg(gen, lo, hi, T, Hv, *((K,) if gate == "key" else ())),
                    beta=torch.rand(T, Hv, generator=gen) * 0.9 + 0.05, use_qk_l2norm=True)
    if op == "ssd":
        H, G, P, N = 4, 2, 8, 16
        return dict(x=randn(gen, T, H, P, dtype=dtype), dt=randn(gen, T, H, scale=0.5),
                    A=-torch.rand(H, generator=gen) * (60.0 if strong else 1.0) - 0.2,
                    B=randn(gen, T, G, N, dtype=dtype), C=randn(gen, T, G, N, dtype=dtype), D=randn(gen, H, P),
                    z=randn(gen, T, H, P, dtype=dtype), dt_bias=randn(gen, H, scale=0.3), dt_softplus=True)
    Ch, W = 24, 4
    return dict(x=randn(gen, T, Ch, dtype=dtype), weight=randn(gen, Ch, W, scale=0.5), bias=randn(gen, Ch),
                activation="silu")


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def both(op, **kw):
    """Run `op` on the cpu backend and on the reference (on float64 copies); returns the cpu result, the
    reference result and the reference's arguments (its caches, updated in place)."""
    ref_kw = {n: (x.clone().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for n, x in kw.items()}
    got = getattr(pa, op)(**kw, backend="cpu")
    want = getattr(pa, op)(**ref_kw, backend="reference")
    return got, want, ref_kw


def assert_close(got, want, dtype=F32):
    """Within a few units of `dtype`'s rounding of the largest magnitude."""
    assert torch.isfinite(got).all()
    tol = {F32: 2e-5, BF16: 3e-2, F16: 4e-3}[dtype] * max(1.0, float(want.abs().max()))
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# ---- sequence forms: long, ragged, boundaries -----------------------------------------------------

BOUNDARY_LENS = [1, C - 1, C, C + 1, 2 * C + 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + C // 2 + 3]


@pytest.mark.parametrize("op", SEQ_OPS)
def test_packed_chunk_and_block_boundaries(op):
    """One packed call over sequences ending on, just before and just after chunk and block boundaries,
    started from a cache with permuted rows, a -1 and has_initial_state."""
    gen = torch.Generator().manual_seed(1)
    lens = BOUNDARY_LENS + [0]
    a = inputs(op, gen, sum(lens))
    slots = len(lens) + 4
    cache = randn(gen, slots, *state_tail(op, a), scale=0.5)
    rows = torch.randperm(slots, generator=gen)[:len(lens)].to(torch.int32)
    rows[3] = -1
    has = torch.rand(len(lens), generator=gen) < 0.7
    got, want, ref = both(op, **a, initial_state=cache, state_indices=rows, has_initial_state=has,
                          cu_seqlens=cu_of(lens), output_final_state=True)
    assert_close(got[0], want[0])
    assert got[1] is cache
    assert_close(cache, ref["initial_state"])


@pytest.mark.parametrize("op,gate", [("linear_attention", None), ("linear_attention", "head"),
                                     ("linear_attention", "key"), ("gated_delta_rule", "head"),
                                     ("gated_delta_rule", "key"), ("ssd", "head"), ("causal_conv1d", "head")])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_long_sequence_many_blocks(op, gate, dtype):
    """One sequence over several blocks with a ragged tail, from an initial state."""
    gen = torch.Generator().manual_seed(2)
    T = 2 * BLOCK + 3 * C + 5
    a = inputs(op, gen, T, dtype=dtype, gate=gate)
    init = randn(gen, 1, *state_tail(op, a), scale=0.5, dtype=dtype if op == "causal_conv1d" else F32)
    got, want, _ = both(op, **a, initial_state=init, output_final_state=True)
    assert got[0].dtype == dtype and got[1].dtype == init.dtype
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype)


@pytest.mark.parametrize("op,gate,decay", [
    ("linear_attention", "head", "strong"), ("linear_attention", "key", "strong"), ("ssd", "head", "strong"),
    ("gated_delta_rule", "head", "strong"), ("gated_delta_rule", "key", "strong"),
    ("linear_attention", "key", "below_span"), ("linear_attention", "key", "above_span"),
    ("gated_delta_rule", "key", "below_span"), ("gated_delta_rule", "key", "above_span")])
def test_strong_decays(op, gate, decay):
    """Log-decays of -20..-40 a token (a chunk sums to about -2000): no overflow, no NaN. Per-key decays
    whose chunk spans sit just below and above chunk.SPAN (the two forms of the per-key scores)."""
    gen = torch.Generator().manual_seed(3)
    a = inputs(op, gen, C + 37, gate=gate, decay=decay)
    init = randn(gen, 1, *state_tail(op, a))
    got, want, _ = both(op, **a, initial_state=init, output_final_state=True)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("op", SEQ_OPS)
def test_empty(op):
    gen = torch.Generator().manual_seed(4)
    a = inputs(op, gen, 0)
    init = randn(gen, 2, *state_tail(op, a))
    out, final = getattr(pa, op)(**a, initial_state=init, cu_seqlens=cu_of([0, 0]), output_final_state=True,
                                 backend="cpu")
    assert out.shape[0] == 0 and torch.equal(final, init)


# ---- resets (g = -inf) and spikes (g = -1e4) among weak decays -------------------------------------

def spiked(op, a, gen, value):
    """Put the log-decay `value` on about one token in eight (per key dim for per-key g), on a chunk's first
    and last tokens among them. For ssd (log-decay d A) on head 1: A = `value`, and d about 1 on those
    tokens, about 1e-9 (a log-decay about 1e-5) on the others."""
    g = a["dt"][:, 1] if op == "ssd" else a["g"]
    hit = torch.rand(g.shape, generator=gen) < 0.12
    hit[[0, C - 1, C, 2 * C - 1]] = True
    if op == "ssd":
        a["A"][1] = value
        g.copy_(torch.where(hit, 0.5, -20.0))
    else:
        g[hit] = value
    return a


RECURRENT = [("linear_attention", "head"), ("linear_attention", "key"), ("gated_delta_rule", "head"),
             ("gated_delta_rule", "key"), ("ssd", "head")]


@pytest.mark.parametrize("op,gate", RECURRENT)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("value", [-torch.inf, -1e4])
def test_reset_and_spiked_decays(op, gate, dtype, value):
    """Log-decays of -inf (a reset: factor 0, never NaN) or -1e4 on some tokens among weak ones, over
    several chunks from an initial state: the weak-decay tolerance (no cancelling cumulative sums)."""
    gen = torch.Generator().manual_seed(13)
    lens = [2 * C + 21, C + 5]
    a = spiked(op, inputs(op, gen, sum(lens), dtype=dtype, gate=gate), gen, value)
    init = randn(gen, len(lens), *state_tail(op, a))
    got, want, _ = both(op, **a, initial_state=init, cu_seqlens=cu_of(lens), output_final_state=True)
    assert torch.isfinite(want[0]).all()
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype)


@pytest.mark.parametrize("op,gate", RECURRENT)
@pytest.mark.parametrize("value", [-torch.inf, -1e4])
def test_reset_and_spiked_decays_step(op, gate, value):
    """The step forms under the same decays, in float32 and bfloat16."""
    gen = torch.Generator().manual_seed(14)
    for dtype in (F32, BF16):
        a = spiked(op, inputs(op, gen, 2 * C, dtype=dtype, gate=gate), gen, value)
        state = randn(gen, 2 * C + 3, *state_tail(op, a))
        rows = torch.randperm(2 * C + 3, generator=gen)[:2 * C].to(torch.int32)
        got, want, ref = both(op + "_step", **a, state=state, state_indices=rows)
        assert_close(got, want, dtype)
        assert_close(state, ref["state"])


# ---- strides --------------------------------------------------------------------------------------

def strided(x):
    """The same values in a non-contiguous tensor (every other element of a wider buffer's last axis)."""
    buf = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    buf[..., 1::2] = x
    buf[..., ::2] = float("nan")
    return buf[..., 1::2]


@pytest.mark.parametrize("op", SEQ_OPS)
def test_strided_inputs_and_cache_view(op):
    """Non-contiguous activations and a cache that is a strided view: the cache is updated in place
    (the buffer around it untouched) and matches the reference."""
    gen = torch.Generator().manual_seed(5)
    lens = [C + 9, 0, 2 * C]
    a = inputs(op, gen, sum(lens))
    a = {n: strided(x) if n in TOKEN_ARGS and isinstance(x, torch.Tensor) and x.dim() > 1 else x for n, x in a.items()}
    assert not a["x" if "x" in a else "q"].is_contiguous()
    buf = randn(gen, 7, 2, *state_tail(op, a), scale=0.5)
    cache = buf[:, 1]                                              # rows of a strided view
    before = buf.clone()
    rows = torch.tensor([4, -1, 1], dtype=torch.int32)
    out = torch.full((sum(lens),) + tuple(a["v" if "v" in a else "x"].shape[1:]), float("nan"))
    got, want, ref = both(op, **a, initial_state=cache, state_indices=rows, cu_seqlens=cu_of(lens),
                          output_final_state=True, out=strided(out))
    assert_close(got[0], want[0])
    assert_close(cache, ref["initial_state"])
    assert torch.equal(buf[:, 0], before[:, 0])                    # the other half of the buffer
    assert torch.equal(buf[[0, 2, 3, 5, 6], 1], before[[0, 2, 3, 5, 6], 1])   # rows not listed


# ---- step forms -----------------------------------------------------------------------------------

STEPS = {"linear_attention_step": "linear_attention", "gated_delta_rule_step": "gated_delta_rule",
         "ssd_step": "ssd", "causal_conv1d_step": "causal_conv1d"}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_large_batch_step(step, dtype):
    """A batch of 96 decode tokens over a 160-row cache (a strided view, in the activation dtype) with
    permuted rows and -1s."""
    gen = torch.Generator().manual_seed(6)
    bsz, slots = 96, 160
    a = inputs(STEPS[step], gen, bsz, dtype=dtype, gate="key" if step != "ssd_step" else "head")
    buf = randn(gen, slots, *state_tail(STEPS[step], a), 3, scale=0.5, dtype=dtype)
    state = buf[..., 1]
    rows = torch.randperm(slots, generator=gen)[:bsz].to(torch.int32)
    rows[torch.randperm(bsz, generator=gen)[:9]] = -1
    before = buf.clone()
    got, want, ref = both(step, **a, state=state, state_indices=rows)
    assert got.dtype == dtype
    assert_close(got, want, dtype)
    assert_close(state, ref["state"], dtype)
    assert torch.equal(buf[..., 0], before[..., 0]) and torch.equal(buf[..., 2], before[..., 2])
    unlisted = sorted(set(range(slots)) - set(rows.tolist()))
    assert torch.equal(state[unlisted], before[..., 1][unlisted])
