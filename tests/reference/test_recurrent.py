"""The reference recurrent ops against NumPy brute force, closed forms and SPEC's invariants.

Calls go through the public API (`backend="reference"`), so the checking layer runs too.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import portable_attn as pa
from portable_attn.backends.reference import precision

from . import brute_recurrent as brute

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
INF = math.inf
OPS = ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d")
TOKEN_ARGS = {
    "linear_attention": ("q", "k", "v", "g"),
    "gated_delta_rule": ("q", "k", "v", "g", "beta"),
    "ssd": ("x", "dt", "B", "C", "z"),
    "causal_conv1d": ("x",),
}
SEQUENCE_ONLY = ("initial_state", "output_final_state", "state_indices", "has_initial_state", "cu_seqlens")


# ---- calling the ops ------------------------------------------------------------------------------

def api(op: str, **kw):
    """The public op on the reference backend (through the checking layer)."""
    return getattr(pa, op)(backend="reference", **kw)


def test_public_dispatch_checks_then_reaches_the_reference():
    q = torch.ones(2, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="state_indices"):
        pa.linear_attention(q, q, q, initial_state=torch.zeros(3, 1, 1, 1, dtype=F64),
                            state_indices=torch.tensor([5], dtype=torch.int32), backend="reference")
    o, _ = pa.linear_attention(q, q, q, scale=1.0, backend="reference")
    assert o.flatten().tolist() == [1.0, 2.0]


# ---- inputs ---------------------------------------------------------------------------------------

def randn(gen, *shape, scale=1.0, dtype=F64):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


def unif(gen, lo, hi, *shape, dtype=F64):
    return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=F64)).to(dtype)


def pdtype(dtype):
    """Gates and parameters: float32 whatever the activation dtype (float64 with float64 activations)."""
    return F64 if dtype == F64 else F32


def make_linear_attention(gen, T, *, H=2, K=3, V=4, g="scalar", dtype=F64, scale=None):
    p = pdtype(dtype)
    a = dict(q=randn(gen, T, H, K, dtype=dtype), k=randn(gen, T, H, K, scale=0.7, dtype=dtype),
             v=randn(gen, T, H, V, dtype=dtype), scale=scale)
    a["g"] = {None: None, "scalar": lambda: -unif(gen, 0.05, 0.7, T, H, dtype=p),
              "key": lambda: -unif(gen, 0.05, 0.7, T, H, K, dtype=p)}[g]
    a["g"] = a["g"]() if a["g"] is not None else None
    return a


def make_gated_delta_rule(gen, T, *, H=2, Hv=4, K=3, V=4, g="scalar", l2=False, dtype=F64, scale=None):
    p = pdtype(dtype)
    a = dict(q=randn(gen, T, H, K, dtype=dtype), k=randn(gen, T, H, K, scale=1.0 if l2 else 0.5, dtype=dtype),
             v=randn(gen, T, Hv, V, dtype=dtype), beta=unif(gen, 0.1, 1.0, T, Hv, dtype=p), scale=scale,
             use_qk_l2norm=l2)
    a["g"] = -unif(gen, 0.05, 0.7, T, Hv, dtype=p) if g == "scalar" else -unif(gen, 0.05, 0.7, T, Hv, K, dtype=p)
    return a


def make_ssd(gen, T, *, H=4, G=2, P=3, N=2, D="H", z=True, dt_bias=True, softplus=True, limit=(0.0, INF),
             dtype=F64):
    p = pdtype(dtype)
    a = dict(x=randn(gen, T, H, P, dtype=dtype),
             dt=randn(gen, T, H, scale=0.7, dtype=p) if softplus else unif(gen, 0.05, 1.0, T, H, dtype=p),
             A=-unif(gen, 0.3, 1.5, H, dtype=p), B=randn(gen, T, G, N, dtype=dtype), C=randn(gen, T, G, N, dtype=dtype),
             D={None: None, "H": lambda: randn(gen, H, dtype=p), "HP": lambda: randn(gen, H, P, dtype=p)}[D],
             z=randn(gen, T, H, P, dtype=dtype) if z else None,
             dt_bias=randn(gen, H, scale=0.3, dtype=p) if dt_bias else None, dt_softplus=softplus, dt_limit=limit)
    a["D"] = a["D"]() if a["D"] is not None else None
    return a


def make_causal_conv1d(gen, T, *, C=3, W=4, bias=True, activation="silu", dtype=F64):
    p = pdtype(dtype)
    return dict(x=randn(gen, T, C, dtype=dtype), weight=randn(gen, C, W, dtype=p),
                bias=randn(gen, C, dtype=p) if bias else None, activation=activation)


MAKE = {"linear_attention": make_linear_attention, "gated_delta_rule": make_gated_delta_rule,
        "ssd": make_ssd, "causal_conv1d": make_causal_conv1d}


def state_tail(op, a):
    if op == "linear_attention":
        return (a["q"].shape[1], a["q"].shape[2], a["v"].shape[2])
    if op == "gated_delta_rule":
        return (a["v"].shape[1], a["q"].shape[2], a["v"].shape[2])
    if op == "ssd":
        return (a["x"].shape[1], a["x"].shape[2], a["B"].shape[2])
    return (a["x"].shape[1], a["weight"].shape[1] - 1)


def npy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.detach().to(F64).cpu().numpy()


def run_brute(op, a, cu=None, init=None):
    n = {key: npy(val) if isinstance(val, torch.Tensor) else val for key, val in a.items()}
    if op == "linear_attention":
        return brute.linear_attention(n["q"], n["k"], n["v"], n["g"], n["scale"], cu, init)
    if op == "gated_delta_rule":
        return brute.gated_delta_rule(n["q"], n["k"], n["v"], n["g"], n["beta"], n["scale"], cu, init,
                                      n["use_qk_l2norm"])
    if op == "ssd":
        return brute.ssd(n["x"], n["dt"], n["A"], n["B"], n["C"], n["D"], n["z"], n["dt_bias"], n["dt_softplus"],
                         n["dt_limit"], cu, init)
    return brute.causal_conv1d(n["x"], n["weight"], n["bias"], n["activation"], cu, init)


def cu_of(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def close(actual, expected, rtol=1e-9, atol=1e-11):
    np.testing.assert_allclose(npy(actual), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


def close_state(actual, expected):
    """A final state: float32 when no initial state fixed its dtype (one rounding), else exact."""
    tol = 1e-9 if actual.dtype == F64 else torch.finfo(actual.dtype).eps
    close(actual, expected, rtol=tol, atol=1e-30 if actual.dtype == F64 else tol * 1e-3)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of x (so NaN == NaN)."""
    return x.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]).clone()


def step_kwargs(op, a):
    return {key: val for key, val in a.items() if key not in TOKEN_ARGS[op] and key not in SEQUENCE_ONLY}


def tokens_at(op, a, rows):
    return {key: (a[key][rows] if a.get(key) is not None else None) for key in TOKEN_ARGS[op] if key in a}


# ---- the ops against the brute force --------------------------------------------------------------

LENS = [3, 0, 1, 5, 2]


@pytest.mark.parametrize("g", [None, "scalar", "key"])
@pytest.mark.parametrize("with_init", [False, True])
def test_linear_attention_matches_brute(g, with_init):
    gen = torch.Generator().manual_seed(1)
    a = make_linear_attention(gen, sum(LENS), g=g, scale=None if g else 0.37)
    init = randn(gen, len(LENS), 2, 3, 4) if with_init else None
    o, fin = api("linear_attention", **a, cu_seqlens=cu_of(LENS), initial_state=init, output_final_state=True)
    eo, efin = run_brute("linear_attention", a, cu_of(LENS).tolist(), None if init is None else list(npy(init)))
    close(o, eo)
    close_state(fin, np.stack(efin))
    assert fin.dtype == (F64 if with_init else F32)


@pytest.mark.parametrize("g", ["scalar", "key"])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("heads", [(2, 4), (2, 2), (1, 3)])
def test_gated_delta_rule_matches_brute(g, l2, heads):
    gen = torch.Generator().manual_seed(2)
    a = make_gated_delta_rule(gen, sum(LENS), H=heads[0], Hv=heads[1], g=g, l2=l2)
    init = randn(gen, len(LENS), heads[1], 3, 4)
    o, fin = api("gated_delta_rule", **a, cu_seqlens=cu_of(LENS), initial_state=init, output_final_state=True)
    eo, efin = run_brute("gated_delta_rule", a, cu_of(LENS).tolist(), list(npy(init)))
    close(o, eo)
    close_state(fin, np.stack(efin))


SSD_OPTIONS = [
    dict(D=None, z=False, dt_bias=False, softplus=False),
    dict(D="H", z=True, dt_bias=True, softplus=True),
    dict(D="HP", z=True, dt_bias=False, softplus=True, limit=(0.2, 0.9)),
    dict(D="HP", z=False, dt_bias=True, softplus=False, limit=(0.3, INF)),
    dict(D="H", z=True, dt_bias=True, softplus=True, G=1),
    dict(D=None, z=True, dt_bias=True, softplus=True, G=4),
]


@pytest.mark.parametrize("opts", SSD_OPTIONS, ids=[str(i) for i in range(len(SSD_OPTIONS))])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_matches_brute(opts, with_init):
    gen = torch.Generator().manual_seed(3)
    a = make_ssd(gen, sum(LENS), **opts)
    init = randn(gen, len(LENS), 4, 3, 2) if with_init else None
    y, fin = api("ssd", **a, cu_seqlens=cu_of(LENS), initial_state=init, output_final_state=True)
    ey, efin = run_brute("ssd", a, cu_of(LENS).tolist(), None if init is None else list(npy(init)))
    close(y, ey)
    close_state(fin, np.stack(efin))


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("bias,activation", [(False, None), (True, "silu"), (True, None)])
@pytest.mark.parametrize("with_init", [False, True])
def test_causal_conv1d_matches_brute(W, bias, activation, with_init):
    gen = torch.Generator().manual_seed(4)
    a = make_causal_conv1d(gen, sum(LENS), W=W, bias=bias, activation=activation)
    init = randn(gen, len(LENS), 3, W - 1) if with_init else None
    y, fin = api("causal_conv1d", **a, cu_seqlens=cu_of(LENS), initial_state=init, output_final_state=True)
    ey, efin = run_brute("causal_conv1d", a, cu_of(LENS).tolist(), None if init is None else list(npy(init)))
    close(y, ey)
    close_state(fin, np.stack(efin))
    assert fin.shape == (len(LENS), 3, W - 1) and fin.dtype == F64


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_low_precision_activations_match_brute(op, dtype):
    """float32 / bf16 activations: computed exactly, rounded once at the output."""
    gen = torch.Generator().manual_seed(5)
    a = MAKE[op](gen, 9, dtype=dtype)
    out, fin = api(op, **a, output_final_state=True)
    assert out.dtype == dtype
    assert fin.dtype == (dtype if op == "causal_conv1d" else F32)
    eo, efin = run_brute(op, a)
    # exact arithmetic, one rounding: bit-equal to the brute force rounded (parameters are not rounded
    # to the activation dtype; a tie within 1e-16 of a rounding midpoint is the only way to differ)
    assert torch.equal(out, torch.from_numpy(eo).to(dtype))
    close(fin[0], efin[0], rtol=1e-6 if op != "causal_conv1d" else 0, atol=1e-6 if op != "causal_conv1d" else 0)


# ---- state caches ---------------------------------------------------------------------------------

def brute_with_cache(op, a, lens, cache, rows, has):
    """The brute force, then SPEC's cache semantics written out: the expected outputs and cache."""
    init = []
    for i, r in enumerate(rows):
        read = r >= 0 and (has is None or has[i])
        init.append(npy(cache[r]) if read else None)
    eo, finals = run_brute(op, a, cu_of(lens).tolist(), init)
    expected = npy(cache).copy()
    for i, r in enumerate(rows):
        if r >= 0:
            expected[r] = finals[i]
    return eo, expected


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("act_dtype,cache_dtype", [(F64, F64), (F64, F32), (BF16, F32), (BF16, BF16)])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_state_cache_matches_brute(op, act_dtype, cache_dtype, output_final_state):
    gen = torch.Generator().manual_seed(6)
    lens = [3, 0, 1, 4, 2, 2]
    a = MAKE[op](gen, sum(lens), dtype=act_dtype)
    slots = 9
    cache = randn(gen, slots, *state_tail(op, a)).to(cache_dtype)
    cache[8] = float("nan")                                     # a row nobody lists
    rows = [5, 2, 7, -1, 0, 3]
    has = [True, True, False, True, True, False]
    before = cache.clone()
    eo, expected = brute_with_cache(op, a, lens, before, rows, has)
    o, fin = api(op, **a, cu_seqlens=cu_of(lens), initial_state=cache, output_final_state=output_final_state,
                 state_indices=torch.tensor(rows, dtype=torch.int32),
                 has_initial_state=torch.tensor(has))
    out_tol = 1e-9 if act_dtype == F64 else torch.finfo(act_dtype).eps
    close(o, eo, rtol=out_tol, atol=out_tol)     # the states read are exact values of the cache
    listed = [r for r in rows if r >= 0]
    # written once into the cache: within one rounding of the exact final state
    rtol = 1e-9 if cache_dtype == F64 else torch.finfo(cache_dtype).eps
    close(cache[listed], expected[listed], rtol=rtol, atol=1e-30)
    others = [r for r in range(slots) if r not in listed]
    assert torch.equal(bits(cache[others]), bits(before[others]))
    assert (fin is cache) if output_final_state else fin is None


@pytest.mark.parametrize("op", OPS)
def test_state_cache_rows_round_trip_in_bf16(op):
    """A bf16 cache row of a sequence that only reads it (length 0) is rewritten with its own value."""
    gen = torch.Generator().manual_seed(7)
    a = MAKE[op](gen, 0, dtype=BF16)
    cache = randn(gen, 3, *state_tail(op, a)).to(BF16)
    before = cache.clone()
    o, _ = api(op, **a, cu_seqlens=cu_of([0, 0]), initial_state=cache,
               state_indices=torch.tensor([2, 0], dtype=torch.int32), has_initial_state=torch.tensor([True, False]))
    assert o.shape[0] == 0
    assert torch.equal(bits(cache[2]), bits(before[2]))
    assert torch.equal(cache[0], torch.zeros_like(cache[0]))    # has_initial_state False: a zero state
    assert torch.equal(bits(cache[1]), bits(before[1]))


@pytest.mark.parametrize("op", OPS)
def test_final_state_dtype_follows_initial_state(op):
    gen = torch.Generator().manual_seed(8)
    a = MAKE[op](gen, 4, dtype=BF16)
    init = randn(gen, 1, *state_tail(op, a)).to(BF16)
    _, fin = api(op, **a, initial_state=init, output_final_state=True)
    assert fin.dtype == BF16 and fin.shape == init.shape
    _, fin32 = api(op, **a, initial_state=init.float(), output_final_state=True)
    assert fin32.dtype == F32
    close(fin, npy(fin32), rtol=2 ** -8, atol=1e-30)
    _, none = api(op, **a)
    assert none is None


# ---- closed forms on tiny cases ---------------------------------------------------------------------

def test_linear_attention_without_gate_is_causal_qk_v():
    gen = torch.Generator().manual_seed(10)
    a = make_linear_attention(gen, 7, g=None, scale=0.6)
    q, k, v = npy(a["q"]), npy(a["k"]), npy(a["v"])
    o, _ = api("linear_attention", **a)
    expected = 0.6 * np.einsum("hts,shv->thv", np.tril(np.einsum("thk,shk->hts", q, k)), v)
    close(o, expected)


def test_linear_attention_constant_gate_is_retnet_decay_matrix():
    gen = torch.Generator().manual_seed(11)
    a = make_linear_attention(gen, 8, g=None)
    gamma = np.array([-0.3, -1.1])
    a["g"] = torch.tensor(gamma)[None, :].expand(8, 2).contiguous()
    q, k, v = npy(a["q"]), npy(a["k"]), npy(a["v"])
    t = np.arange(8)
    decay = np.where(t[:, None] >= t[None, :], np.exp((t[:, None] - t[None, :])[None] * gamma[:, None, None]), 0.0)
    expected = np.einsum("hts,shv->thv", np.einsum("thk,shk->hts", q, k) * decay, v) / math.sqrt(3)
    o, _ = api("linear_attention", **a)
    close(o, expected)


def test_linear_attention_per_key_gate_is_gla():
    """The per-key-dim gate decays the K axis of the state: o_t = sum_{j<=t} sum_a q_ta k_ja e^{G_ta - G_ja} v_j."""
    gen = torch.Generator().manual_seed(12)
    a = make_linear_attention(gen, 6, g="key", K=3, V=2)
    q, k, v, g = npy(a["q"]), npy(a["k"]), npy(a["v"]), npy(a["g"])
    G = np.cumsum(g, axis=0)                                      # [T, H, K]
    causal = np.tril(np.ones((6, 6), dtype=bool))                 # [t, s]
    decay = np.where(causal[:, :, None, None], np.exp(np.minimum(G[:, None] - G[None, :], 0.0)), 0.0)
    w = np.einsum("tha,sha,tsha->hts", q, k, decay)
    o, _ = api("linear_attention", **a)
    close(o, np.einsum("hts,shv->thv", w, v) / math.sqrt(3))


def test_conv1d_is_numpy_convolution():
    gen = torch.Generator().manual_seed(13)
    a = make_causal_conv1d(gen, 9, C=3, W=4, bias=False, activation=None)
    x, w = npy(a["x"]), npy(a["weight"])
    expected = np.stack([np.convolve(x[:, c], w[c, ::-1])[:9] for c in range(3)], axis=1)
    y, _ = api("causal_conv1d", **a)
    close(y, expected)
    a["bias"], a["activation"] = randn(gen, 3), "silu"
    y, _ = api("causal_conv1d", **a)
    pre = expected + npy(a["bias"])
    close(y, pre / (1 + np.exp(-pre)))


@pytest.mark.parametrize("L", [0, 1, 2, 5])
def test_conv1d_final_state_reaches_into_initial_state(L):
    gen = torch.Generator().manual_seed(14)
    a = make_causal_conv1d(gen, L, C=2, W=4)
    init = randn(gen, 1, 2, 3)
    _, fin = api("causal_conv1d", **a, initial_state=init, output_final_state=True)
    hist = np.concatenate([npy(init)[0], npy(a["x"]).T], axis=1)  # [C, 3 + L], oldest first
    close(fin[0], hist[:, -3:], rtol=0, atol=0)


def test_delta_rule_with_zero_beta_keeps_the_state():
    gen = torch.Generator().manual_seed(15)
    a = make_gated_delta_rule(gen, 6, H=2, Hv=2, g="scalar")
    a["beta"] = torch.zeros(6, 2, dtype=F64)
    S0 = randn(gen, 1, 2, 3, 4)
    o, fin = api("gated_delta_rule", **a, initial_state=S0, output_final_state=True)
    G = np.cumsum(npy(a["g"]), axis=0)                            # [T, Hv]
    states = np.exp(G)[:, :, None, None] * npy(S0)[0][None]        # S_t = exp(G_t) S_0
    close(fin[0], states[-1])
    close(o, np.einsum("thkv,thk->thv", states, npy(a["q"])) / math.sqrt(3))


def test_delta_rule_stores_v_exactly():
    """g = 0, beta = 1, unit-norm k: after each update S^T k_t == v_t."""
    gen = torch.Generator().manual_seed(16)
    T = 5
    a = make_gated_delta_rule(gen, T, H=1, Hv=2, g="scalar")
    k = a["k"] / a["k"].norm(dim=-1, keepdim=True)
    a.update(k=k, g=torch.zeros(T, 2, dtype=F64), beta=torch.ones(T, 2, dtype=F64))
    state = randn(gen, 2, 2, 3, 4)
    for t in range(T):
        api("gated_delta_rule_step", **tokens_at("gated_delta_rule", a, [t]), **step_kwargs("gated_delta_rule", a),
            state=state, state_indices=torch.tensor([1], dtype=torch.int32))
        recalled = np.einsum("hkv,k->hv", npy(state[1]), npy(k[t, 0]))
        close(recalled, npy(a["v"][t]), rtol=1e-12, atol=1e-12)
    _, fin = api("gated_delta_rule", **a, output_final_state=True)
    close(np.einsum("hkv,k->hv", npy(fin[0]), npy(k[-1, 0])), npy(a["v"][-1]), rtol=1e-6, atol=1e-6)


def test_ssd_with_zero_A_is_a_cumulative_sum():
    gen = torch.Generator().manual_seed(17)
    a = make_ssd(gen, 7, H=2, G=1, D="H", z=False, dt_bias=False, softplus=False)
    a["A"] = torch.zeros(2, dtype=F64)
    x, d, B, C, D = npy(a["x"]), npy(a["dt"]), npy(a["B"])[:, 0], npy(a["C"])[:, 0], npy(a["D"])
    h = np.cumsum(d[:, :, None, None] * x[:, :, :, None] * B[:, None, None, :], axis=0)   # [T, H, P, N]
    expected = np.einsum("thpn,tn->thp", h, C) + D[None, :, None] * x
    y, fin = api("ssd", **a, output_final_state=True)
    close(y, expected)
    close_state(fin[0], h[-1])


def test_ssd_negative_dt_without_softplus_clamps_to_zero():
    """dt < 0, default dt_limit (0, inf): d = 0, the state stays, y = h_0 C_t + D x_t."""
    gen = torch.Generator().manual_seed(18)
    a = make_ssd(gen, 5, H=2, G=2, D="HP", z=False, dt_bias=False, softplus=False)
    a["dt"] = -unif(gen, 0.1, 2.0, 5, 2)
    h0 = randn(gen, 1, 2, 3, 2)
    y, fin = api("ssd", **a, initial_state=h0, output_final_state=True)
    close(fin, npy(h0), rtol=0, atol=0)
    expected = np.einsum("hpn,thn->thp", npy(h0)[0], npy(a["C"])) + npy(a["D"])[None] * npy(a["x"])
    close(y, expected)


def test_ssd_dt_pipeline_order():
    """bias, then softplus, then the clamp: equals precomputed d with no bias, no softplus, no limit."""
    gen = torch.Generator().manual_seed(19)
    a = make_ssd(gen, 6, softplus=True, dt_bias=True, limit=(0.4, 0.8))
    d = np.clip(np.logaddexp(0, npy(a["dt"]) + npy(a["dt_bias"])[None]), 0.4, 0.8)
    assert (d == 0.4).any() and (d == 0.8).any() and ((d > 0.4) & (d < 0.8)).any()
    y, _ = api("ssd", **a)
    y2, _ = api("ssd", **{**a, "dt": torch.tensor(d), "dt_bias": None, "dt_softplus": False, "dt_limit": (0.0, INF)})
    close(y, npy(y2), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule"])
def test_scale_zero_is_a_value_and_none_is_rsqrt_k(op):
    gen = torch.Generator().manual_seed(20)
    a = MAKE[op](gen, 5)
    init = randn(gen, 1, *state_tail(op, a))
    o0, _ = api(op, **{**a, "scale": 0.0}, initial_state=init)
    assert torch.equal(o0, torch.zeros_like(o0))
    o_none, _ = api(op, **{**a, "scale": None}, initial_state=init)
    o_exp, _ = api(op, **{**a, "scale": 1 / math.sqrt(a["q"].shape[2])}, initial_state=init)
    o_two, _ = api(op, **{**a, "scale": 2.0}, initial_state=init)
    close(o_none, npy(o_exp), rtol=1e-14, atol=0)
    close(o_two, 2 * math.sqrt(3) * npy(o_exp), rtol=1e-12, atol=1e-14)


def test_grouped_heads_equal_repeated_heads():
    gen = torch.Generator().manual_seed(21)
    a = make_gated_delta_rule(gen, 6, H=2, Hv=6, g="key", l2=True)
    o, _ = api("gated_delta_rule", **a)
    rep = {**a, "q": a["q"].repeat_interleave(3, dim=1), "k": a["k"].repeat_interleave(3, dim=1)}
    o_rep, _ = api("gated_delta_rule", **rep)
    close(o, npy(o_rep), rtol=1e-14, atol=1e-14)
    s = make_ssd(gen, 6, H=6, G=2)
    y, _ = api("ssd", **s)
    y_rep, _ = api("ssd", **{**s, "B": s["B"].repeat_interleave(3, dim=1), "C": s["C"].repeat_interleave(3, dim=1)})
    close(y, npy(y_rep), rtol=1e-14, atol=1e-14)
    # and the grouping is h // (Hv // H), not h % H
    tiled = {**a, "q": a["q"].repeat(1, 3, 1), "k": a["k"].repeat(1, 3, 1)}
    o_tiled, _ = api("gated_delta_rule", **tiled)
    assert not np.allclose(npy(o), npy(o_tiled))


# ---- SPEC invariants, through the public API --------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_packed_varlen_equals_one_by_one(op):
    gen = torch.Generator().manual_seed(30)
    lens = [4, 0, 1, 6]
    a = MAKE[op](gen, sum(lens))
    init = randn(gen, len(lens), *state_tail(op, a))
    cu = cu_of(lens).tolist()
    o, fin = api(op, **a, cu_seqlens=cu_of(lens), initial_state=init, output_final_state=True)
    for i in range(len(lens)):
        part = {key: (val[cu[i]:cu[i + 1]] if key in TOKEN_ARGS[op] and val is not None else val)
                for key, val in a.items()}
        oi, fi = api(op, **part, initial_state=init[i:i + 1], output_final_state=True)
        assert torch.equal(o[cu[i]:cu[i + 1]], oi)
        assert torch.equal(fin[i], fi[0])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("state_dtype", [F64, F32])
def test_step_token_by_token_equals_sequence(op, state_dtype):
    gen = torch.Generator().manual_seed(31)
    lens = [3, 0, 5, 1]
    a = MAKE[op](gen, sum(lens))
    cu = cu_of(lens).tolist()
    rows = [4, 1, 0, -1]          # -1 on a one-token sequence: a zero state in both forms
    cache = randn(gen, 6, *state_tail(op, a)).to(state_dtype)
    step_cache = cache.clone()
    o, _ = api(op, **a, cu_seqlens=cu_of(lens), initial_state=cache,
               state_indices=torch.tensor(rows, dtype=torch.int32))
    o_step = torch.full_like(o, float("nan"))
    for j in range(max(lens)):
        live = [i for i in range(len(lens)) if lens[i] > j]
        toks = [cu[i] + j for i in live]
        idx = torch.tensor([rows[i] for i in live], dtype=torch.int32)
        o_step[toks] = api(op + "_step", **tokens_at(op, a, toks), **step_kwargs(op, a), state=step_cache,
                           state_indices=idx)
    if state_dtype == F64:
        close(o_step, npy(o), rtol=1e-12, atol=1e-13)
        close(step_cache, npy(cache), rtol=1e-12, atol=1e-13)
    else:   # the step form rounds the state to the cache dtype after every token
        close(o_step, npy(o), rtol=1e-5, atol=1e-5)
        close(step_cache, npy(cache), rtol=1e-5, atol=1e-5)
    assert torch.equal(bits(step_cache[[2, 3, 5]]), bits(cache[[2, 3, 5]]))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("split", [0, 2, 5])
def test_split_sequence_resumed_through_cache_equals_whole(op, split):
    gen = torch.Generator().manual_seed(32)
    lens = [5, 7, 6]
    a = MAKE[op](gen, sum(lens))
    cu = cu_of(lens).tolist()
    init = randn(gen, len(lens), *state_tail(op, a))
    o, fin = api(op, **a, cu_seqlens=cu_of(lens), initial_state=init, output_final_state=True)

    rows = torch.tensor([3, 0, 4], dtype=torch.int32)
    cache = randn(gen, 5, *state_tail(op, a))
    cache[rows.long()] = init
    untouched = bits(cache[[1, 2]])
    first = [min(split, n) for n in lens]
    second = [n - f for n, f in zip(lens, first)]
    idx1 = [t for i in range(3) for t in range(cu[i], cu[i] + first[i])]
    idx2 = [t for i in range(3) for t in range(cu[i] + first[i], cu[i + 1])]

    def part(idx):
        return {key: (val[idx] if key in TOKEN_ARGS[op] and val is not None else val) for key, val in a.items()}

    o1, _ = api(op, **part(idx1), cu_seqlens=cu_of(first), initial_state=cache, state_indices=rows)
    o2, ret = api(op, **part(idx2), cu_seqlens=cu_of(second), initial_state=cache, state_indices=rows,
                  output_final_state=True)
    assert ret is cache
    close(torch.cat([o1, o2]), npy(o[idx1 + idx2]), rtol=1e-12, atol=1e-13)
    close(cache[rows.long()], npy(fin), rtol=1e-12, atol=1e-13)
    assert torch.equal(bits(cache[[1, 2]]), untouched)


@pytest.mark.parametrize("op", OPS)
def test_unlisted_rows_bit_identical_even_nan(op):
    gen = torch.Generator().manual_seed(33)
    a = MAKE[op](gen, 6, dtype=BF16)
    tail = state_tail(op, a)
    cache = randn(gen, 5, *tail).to(BF16)
    cache[1] = float("nan")
    cache[3] = -float("inf")
    before = bits(cache)
    api(op, **a, cu_seqlens=cu_of([2, 4]), initial_state=cache, state_indices=torch.tensor([4, 0], dtype=torch.int32))
    after = bits(cache)
    assert torch.equal(after[[1, 2, 3]], before[[1, 2, 3]])
    if tail[-1] > 0:
        assert not torch.equal(after[[0, 4]], before[[0, 4]])
    # step form: unlisted rows and the -1 entry leave the state untouched too
    before = bits(cache)
    out = api(op + "_step", **tokens_at(op, a, [0, 1]), **step_kwargs(op, a), state=cache,
              state_indices=torch.tensor([-1, 2], dtype=torch.int32))
    after = bits(cache)
    assert torch.equal(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert torch.isfinite(out.float()).all()


def test_step_without_state_indices_uses_the_first_rows():
    gen = torch.Generator().manual_seed(34)
    a = make_linear_attention(gen, 2, g="scalar")
    state = randn(gen, 4, 2, 3, 4)
    before = state.clone()
    ref = state.clone()
    o = api("linear_attention_step", **tokens_at("linear_attention", a, [0, 1]),
            **step_kwargs("linear_attention", a), state=state)
    o2 = api("linear_attention_step", **tokens_at("linear_attention", a, [0, 1]),
             **step_kwargs("linear_attention", a), state=ref, state_indices=torch.tensor([0, 1], dtype=torch.int32))
    assert torch.equal(o, o2) and torch.equal(state, ref)
    assert torch.equal(state[2:], before[2:])
    assert not torch.equal(state[0], before[0]) and not torch.equal(state[1], before[1])


STRONG = {
    "linear_attention": lambda gen, T: {**make_linear_attention(gen, T, g="scalar"), "g": torch.full((T, 2), -100.0)},
    "linear_attention_key": lambda gen, T: {**make_linear_attention(gen, T, g="key"),
                                            "g": -unif(gen, 60, 120, T, 2, 3)},
    "gated_delta_rule": lambda gen, T: {**make_gated_delta_rule(gen, T, g="scalar"), "g": torch.full((T, 4), -95.0)},
    "ssd": lambda gen, T: {**make_ssd(gen, T, softplus=False), "A": torch.full((4,), -150.0, dtype=F64)},
}


@pytest.mark.parametrize("case", list(STRONG))
@pytest.mark.parametrize("lowp", [False, True])
def test_strong_decays_stay_finite_and_correct(case, lowp):
    gen = torch.Generator().manual_seed(35)
    op = case.replace("_key", "")
    a = STRONG[case](gen, 24)
    if lowp:    # float32 activations and gates, computed like a bf16 kernel
        a = {key: (val.float() if isinstance(val, torch.Tensor) else val) for key, val in a.items()}
    init = randn(gen, 1, *state_tail(op, a)).to(a[TOKEN_ARGS[op][0]].dtype)
    with precision.emulate(BF16) if lowp else contextlib.nullcontext():
        o, fin = api(op, **a, initial_state=init, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(fin).all()
    eo, efin = run_brute(op, a, None, [npy(init[0])])
    if lowp:
        close(o, eo, rtol=5e-2, atol=5e-2 * np.abs(eo).max())
    else:
        close(o, eo)
        close(fin[0], efin[0])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("step", [False, True])
def test_out_prefilled_with_nan_is_fully_written(op, step):
    gen = torch.Generator().manual_seed(36)
    a = MAKE[op](gen, 5, dtype=F32)
    tail = state_tail(op, a)
    if step:
        kw = dict(**tokens_at(op, a, [0, 2, 4]), **step_kwargs(op, a))
        state = randn(gen, 4, *tail).float()
        rows = torch.tensor([3, -1, 0], dtype=torch.int32)
        expected = api(op + "_step", **kw, state=state.clone(), state_indices=rows)
        out = torch.full_like(expected, float("nan"))
        ret = api(op + "_step", **kw, state=state, state_indices=rows, out=out)
    else:
        expected, _ = api(op, **a, cu_seqlens=cu_of([2, 0, 3]))
        out = torch.full_like(expected, float("nan"))
        ret, _ = api(op, **a, cu_seqlens=cu_of([2, 0, 3]), out=out)
    assert ret is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "ssd"])
def test_emulated_bf16_is_close_but_not_equal(op):
    gen = torch.Generator().manual_seed(37)
    a = MAKE[op](gen, 12, dtype=F32)
    init = randn(gen, 1, *state_tail(op, a)).float()
    exact, fin = api(op, **a, initial_state=init, output_final_state=True)
    with precision.emulate(BF16):
        low, fin_low = api(op, **a, initial_state=init, output_final_state=True)
    assert exact.dtype == low.dtype == F32
    assert not torch.equal(exact, low) and not torch.equal(fin, fin_low)
    err = (low - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 3e-2


@pytest.mark.parametrize("op", OPS)
def test_empty_inputs(op):
    gen = torch.Generator().manual_seed(38)
    a = MAKE[op](gen, 0)
    tail = state_tail(op, a)
    o, fin = api(op, **a, output_final_state=True)
    assert o.shape[0] == 0 and torch.equal(fin, torch.zeros(1, *tail, dtype=fin.dtype))
    init = randn(gen, 3, *tail)
    o, fin = api(op, **a, cu_seqlens=cu_of([0, 0, 0]), initial_state=init, output_final_state=True)
    assert torch.equal(fin, init) and fin is not init
    step = api(op + "_step", **tokens_at(op, a, []), **step_kwargs(op, a), state=init)
    assert step.shape[0] == 0


@pytest.mark.parametrize("op", OPS)
def test_strided_inputs_and_a_strided_cache(op):
    gen = torch.Generator().manual_seed(39)
    lens = [3, 4]
    a = MAKE[op](gen, sum(lens))
    tail = state_tail(op, a)
    # every tensor argument as a non-contiguous view with the same values
    strided = {}
    for key, val in a.items():
        if isinstance(val, torch.Tensor):
            buf = torch.zeros(val.shape + (2,), dtype=val.dtype)
            buf[..., 1] = val
            strided[key] = buf[..., 1]
            assert val.dim() == 0 or not strided[key].is_contiguous() or val.numel() <= 1
        else:
            strided[key] = val
    cache = randn(gen, 4, *tail)
    buf = randn(gen, 4, *tail, 2)
    buf[..., 0] = cache
    view = buf[..., 0]
    other = buf[..., 1].clone()
    rows = torch.tensor([2, 0], dtype=torch.int32)
    o, _ = api(op, **a, cu_seqlens=cu_of(lens), initial_state=cache, state_indices=rows)
    o_s, ret = api(op, **strided, cu_seqlens=cu_of(lens), initial_state=view, state_indices=rows,
                   output_final_state=True)
    assert ret is view
    assert torch.equal(o, o_s)
    assert torch.equal(buf[..., 0], cache)           # written through the view, in place
    assert torch.equal(buf[..., 1], other)


# ---- property tests against the brute force ------------------------------------------------------

@st.composite
def batches(draw):
    """Ragged lengths, a cache with permuted rows, -1 entries and has_initial_state flags."""
    lens = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    nseq = len(lens)
    slots = nseq + draw(st.integers(0, 3))
    rows = draw(st.permutations(list(range(slots))))[:nseq]
    drop = draw(st.lists(st.booleans(), min_size=nseq, max_size=nseq))
    rows = [-1 if d else r for r, d in zip(rows, drop)]
    has = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=nseq, max_size=nseq)))
    mode = draw(st.sampled_from(["none", "init", "cache"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(lens=lens, slots=slots, rows=rows, has=has, mode=mode, seed=seed)


def check_against_brute(op, a, b, gen):
    lens, tail = b["lens"], state_tail(op, a)
    cu = cu_of(lens)
    if b["mode"] == "cache":
        cache = randn(gen, b["slots"], *tail)
        before = cache.clone()
        eo, expected = brute_with_cache(op, a, lens, before, b["rows"], b["has"])
        o, _ = api(op, **a, cu_seqlens=cu, initial_state=cache,
                   state_indices=torch.tensor(b["rows"], dtype=torch.int32),
                   has_initial_state=None if b["has"] is None else torch.tensor(b["has"]))
        close(o, eo, rtol=1e-9, atol=1e-10)
        close(cache, expected, rtol=1e-9, atol=1e-10)
        listed = {r for r in b["rows"] if r >= 0}
        others = [r for r in range(b["slots"]) if r not in listed]
        assert torch.equal(bits(cache[others]), bits(before[others]))
    else:
        init = randn(gen, len(lens), *tail) if b["mode"] == "init" else None
        o, fin = api(op, **a, cu_seqlens=cu, initial_state=init, output_final_state=True)
        eo, efin = run_brute(op, a, cu.tolist(), None if init is None else list(npy(init)))
        close(o, eo, rtol=1e-9, atol=1e-10)
        close_state(fin, np.stack(efin))


PROPS = settings(max_examples=40, deadline=None)


@PROPS
@given(b=batches(), H=st.integers(1, 3), K=st.integers(1, 4), V=st.integers(1, 4),
       g=st.sampled_from([None, "scalar", "key"]), scale=st.sampled_from([None, 0.5, 1.7]))
def test_linear_attention_property(b, H, K, V, g, scale):
    gen = torch.Generator().manual_seed(b["seed"])
    a = make_linear_attention(gen, sum(b["lens"]), H=H, K=K, V=V, g=g, scale=scale)
    check_against_brute("linear_attention", a, b, gen)


@PROPS
@given(b=batches(), H=st.integers(1, 2), ratio=st.integers(1, 3), K=st.integers(1, 4), V=st.integers(1, 4),
       g=st.sampled_from(["scalar", "key"]), l2=st.booleans())
def test_gated_delta_rule_property(b, H, ratio, K, V, g, l2):
    gen = torch.Generator().manual_seed(b["seed"])
    a = make_gated_delta_rule(gen, sum(b["lens"]), H=H, Hv=H * ratio, K=K, V=V, g=g, l2=l2)
    check_against_brute("gated_delta_rule", a, b, gen)


@PROPS
@given(b=batches(), G=st.integers(1, 2), ratio=st.integers(1, 3), P=st.integers(1, 3), N=st.integers(1, 4),
       D=st.sampled_from([None, "H", "HP"]), z=st.booleans(), dt_bias=st.booleans(), softplus=st.booleans(),
       limit=st.sampled_from([(0.0, INF), (0.1, 0.6), (0.5, INF)]))
def test_ssd_property(b, G, ratio, P, N, D, z, dt_bias, softplus, limit):
    gen = torch.Generator().manual_seed(b["seed"])
    a = make_ssd(gen, sum(b["lens"]), H=G * ratio, G=G, P=P, N=N, D=D, z=z, dt_bias=dt_bias, softplus=softplus,
                 limit=limit)
    check_against_brute("ssd", a, b, gen)


@PROPS
@given(b=batches(), C=st.integers(1, 5), W=st.integers(1, 5), bias=st.booleans(),
       activation=st.sampled_from([None, "silu"]))
def test_causal_conv1d_property(b, C, W, bias, activation):
    gen = torch.Generator().manual_seed(b["seed"])
    a = make_causal_conv1d(gen, sum(b["lens"]), C=C, W=W, bias=bias, activation=activation)
    check_against_brute("causal_conv1d", a, b, gen)


@PROPS
@given(b=batches(), op=st.sampled_from(OPS))
def test_step_forms_property(b, op):
    """Random subsets of cache rows (with -1), one token each: the step form against the brute force."""
    gen = torch.Generator().manual_seed(b["seed"])
    bsz = len(b["lens"])
    a = MAKE[op](gen, bsz)
    cache = randn(gen, b["slots"], *state_tail(op, a))
    before = cache.clone()
    eo, expected = brute_with_cache(op, a, [1] * bsz, before, b["rows"], None)
    o = api(op + "_step", **tokens_at(op, a, list(range(bsz))), **step_kwargs(op, a), state=cache,
            state_indices=torch.tensor(b["rows"], dtype=torch.int32))
    close(o, eo)
    close(cache, expected)
