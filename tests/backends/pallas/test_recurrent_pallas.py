"""The pallas backend's recurrent ops in Pallas' TPU interpret mode, called directly (JAX arrays in and
out, caches returned updated) against the float64 reference where conformance (`portable-attn check
--backend pallas`) does not reach: many chunks with ragged tails and empty sequences, per-key strong
decays, bf16 caches, T = 0, jax.jit of every function, default step rows; the blocked triangular
inverse; and every kernel configuration of the block-size table lowered for the TPU (which enforces
the (8, 128) tiling)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="jax not installed: pip install -e '.[pallas-interpret]'")
import jax.numpy as jnp  # noqa: E402

from portable_attn.backends.pallas import chunk, conv, delta, linear, ssd, tuning  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.backends.reference.precision import emulate  # noqa: E402

import portable_attn as pa  # noqa: E402
from tests.backends.compare import state_tail  # noqa: E402

FUNCS = {"linear_attention": linear.linear_attention, "linear_attention_step": linear.linear_attention_step,
         "gated_delta_rule": delta.gated_delta_rule, "gated_delta_rule_step": delta.gated_delta_rule_step,
         "ssd": ssd.ssd, "ssd_step": ssd.ssd_step,
         "causal_conv1d": conv.causal_conv1d, "causal_conv1d_step": conv.causal_conv1d_step}
TORCH = {jnp.dtype(n): getattr(torch, n) for n in ("float32", "float16", "bfloat16")}


def to_jax(x):
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.bfloat16:
        return jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(x.numpy())


def to_torch(a, dtype):
    return torch.from_numpy(np.array(a.astype(jnp.float32))).to(dtype)


def direct(op: str, inputs: dict):
    """`op` of the pallas backend on torch `inputs`, as the torch bridge calls it: JAX arrays in, the
    returned cache (in the cache's dtype) copied back into the torch cache. Returns (y, state) in torch."""
    kw = {n: to_jax(v) for n, v in inputs.items() if n != "out"}
    y, state = FUNCS[op](**kw)
    y = to_torch(y, TORCH[y.dtype])
    cache = "state" if op.endswith("_step") else ("initial_state" if inputs.get("state_indices") is not None else None)
    if cache is not None:
        assert TORCH[state.dtype] == inputs[cache].dtype and state.shape == inputs[cache].shape
        inputs[cache].copy_(to_torch(state, inputs[cache].dtype))
        return y, inputs[cache]
    return y, (None if state is None else to_torch(state, TORCH[state.dtype]))


C = tuning.recurrent().chunk
TPU_BLOCKS = sorted({tuning.RECURRENT[g] for g in tuning.GENERATIONS}, key=lambda b: (b.chunk, b.sub))  # distinct
F32, BF16 = torch.float32, torch.bfloat16


def randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def neg(gen, lo, hi, *shape):
    return -(lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64))


def inputs(op, gen, T, *, gate="head", strong=False):
    """float64 token and parameter inputs of `op` for T tokens (grouped heads where the op has them)."""
    lo, hi = (20.0, 40.0) if strong else (0.01, 0.4)
    if op == "linear_attention":
        H, K, V = 2, 16, 12
        g = None if gate is None else neg(gen, lo, hi, T, H, *((K,) if gate == "key" else ()))
        return dict(q=randn(gen, T, H, K), k=randn(gen, T, H, K, scale=K ** -0.5), v=randn(gen, T, H, V), g=g,
                    scale=K ** -0.5)
    if op == "gated_delta_rule":
        H, Hv, K, V = 1, 2, 16, 12
        return dict(q=randn(gen, T, H, K), k=randn(gen, T, H, K), v=randn(gen, T, Hv, V),
                    g=neg(gen, lo, hi, T, Hv, *((K,) if gate == "key" else ())),
                    beta=torch.rand(T, Hv, generator=gen, dtype=torch.float64) * 0.9 + 0.05, use_qk_l2norm=True,
                    scale=K ** -0.5)
    if op == "ssd":
        H, G, P, N = 4, 2, 8, 16
        return dict(x=randn(gen, T, H, P), dt=randn(gen, T, H, scale=0.5),
                    A=-torch.rand(H, generator=gen, dtype=torch.float64) * (60.0 if strong else 1.0) - 0.2,
                    B=randn(gen, T, G, N), C=randn(gen, T, G, N), D=randn(gen, H, P), z=randn(gen, T, H, P),
                    dt_bias=randn(gen, H, scale=0.3), dt_softplus=True)
    return dict(x=randn(gen, T, 24), weight=randn(gen, 24, 4, scale=0.5), bias=randn(gen, 24), activation="silu")


ACT = {"q", "k", "v", "x", "z", "B", "C", "weight", "bias"}


def cast(a: dict, dtype) -> dict:
    """Activations in `dtype`, the other floats float32 (as conformance draws them)."""
    return {n: (v.to(dtype if n in ACT else F32) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for n, v in a.items()}


def both(op, dtype=F32, **kw):
    """(y, state) of the pallas functions on `kw` (floats as `cast` puts them), of the float64 oracle and
    of the reference in `dtype` (the tolerance budget); state: the final states or the updated cache."""
    mine = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    up = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()}
    low = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    got = direct(op, mine)
    want = getattr(pa, op)(**up, backend="reference")
    with emulate(dtype):
        base = getattr(pa, op)(**low, backend="reference")
    if op.endswith("_step"):
        want, base = (want, up["state"]), (base, low["state"])
    return got, want, base


def check(got, want, base, dtype):
    v = compare(got, want, base, dtype)
    assert v.ok, f"err {v.err:.3g} > tol {v.tol:.3g} {v.detail}"


def cu_of(lens):
    return torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)


SEQ_OPS = ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d")


@pytest.mark.parametrize("op,gate", [("linear_attention", None), ("linear_attention", "key"),
                                     ("gated_delta_rule", "head"), ("gated_delta_rule", "key"), ("ssd", "head"),
                                     ("causal_conv1d", "head")])
def test_packed_chunks_ragged_cache(op, gate):
    """One packed call over sequences ending just before, on and after chunk boundaries, several chunks
    with a ragged last one and an empty sequence, from a cache with permuted rows, a -1 and
    has_initial_state."""
    gen = torch.Generator().manual_seed(1)
    lens = [1, C - 1, C, 2 * C + 3, 0]
    a = cast(inputs(op, gen, sum(lens), gate=gate), F32)
    slots = len(lens) + 3
    cache = randn(gen, slots, *state_tail(op, a), scale=0.5).float()
    rows = torch.randperm(slots, generator=gen)[:len(lens)].to(torch.int32)
    rows[2] = -1
    has = torch.tensor([True, False, True, True, True])
    (y, c), (wy, wc), (by, bc) = both(op, **a, initial_state=cache, state_indices=rows, has_initial_state=has,
                                      cu_seqlens=cu_of(lens), output_final_state=True)
    check(y, wy, by, F32)
    check(c, wc, bc, F32)
    unlisted = [r for r in range(slots) if r not in rows.tolist()]
    assert torch.equal(c[unlisted], cache[unlisted])


@pytest.mark.parametrize("op,gate", [("linear_attention", "head"), ("linear_attention", "key"), ("ssd", "head"),
                                     ("gated_delta_rule", "head"), ("gated_delta_rule", "key")])
def test_strong_decays(op, gate):
    """Log-decays of -20..-40 a token (a chunk sums far below -88): no overflow, no NaN."""
    gen = torch.Generator().manual_seed(3)
    a = cast(inputs(op, gen, C + 11, gate=gate, strong=True), F32)
    init = randn(gen, 1, *state_tail(op, a)).float()
    (y, s), (wy, ws), (by, bs) = both(op, **a, initial_state=init, output_final_state=True)
    check(y, wy, by, F32)
    check(s, ws, bs, F32)


def reset_and_huge_decays(a: dict, op: str) -> dict:
    """-inf (a state reset) on some tokens and -1e4 on others; SSD: d A of -1e4 on one head and an A whose
    product with d overflows float32 to -inf on another."""
    a = dict(a)
    if op.startswith("ssd"):
        A = a["A"].clone()
        A[0], A[1] = -1e4, -3e38
        a["A"] = A
        return a
    g = a["g"].clone()
    n = g.shape[0]
    g[n // 5] = -float("inf")
    g[n // 2] = -1e4
    g[n // 2 + 1:n // 2 + 4, 0] = -1e4
    g[-1, -1] = -float("inf")
    a["g"] = g
    return a


def check_floor(got, want):
    """Within the float32 floor relative to the output magnitude, whatever the emulated reference does."""
    check(got, want, want, F32)


@pytest.mark.parametrize("op,gate", [("linear_attention", "head"), ("linear_attention", "key"), ("ssd", "head"),
                                     ("gated_delta_rule", "head"), ("gated_delta_rule", "key")])
def test_minus_inf_and_huge_decays(op, gate):
    """docs/spec.md "g = -inf" and "Accuracy under strong decays": finite, and as accurate as under weak
    decays (segment sums, never differences of large cumulative sums)."""
    gen = torch.Generator().manual_seed(10)
    a = reset_and_huge_decays(cast(inputs(op, gen, 2 * C + 7, gate=gate), F32), op)
    init = randn(gen, 2, *state_tail(op, a)).float()
    (y, s), (wy, ws), _ = both(op, **a, initial_state=init, cu_seqlens=cu_of([C + 3, C + 4]), output_final_state=True)
    check_floor(y, wy)
    check_floor(s, ws)


@pytest.mark.parametrize("op,gate", [("linear_attention_step", "key"), ("gated_delta_rule_step", "head"),
                                     ("ssd_step", "head")])
def test_step_minus_inf_and_huge_decays(op, gate):
    gen = torch.Generator().manual_seed(11)
    a = reset_and_huge_decays(cast(inputs(op[:-len("_step")], gen, 5, gate=gate), F32), op)
    state = randn(gen, 6, *state_tail(op[:-len("_step")], a), scale=0.5).float()
    (y, s), (wy, ws), _ = both(op, **a, state=state, state_indices=torch.tensor([5, 0, -1, 2, 3], dtype=torch.int32))
    check_floor(y, wy)
    check_floor(s, ws)


@pytest.mark.parametrize("op", SEQ_OPS)
def test_bf16_cache_and_activations(op):
    """bf16 activations and a bf16 state cache: states computed in float32, stored back in bf16."""
    gen = torch.Generator().manual_seed(5)
    lens = [C + 5, 3]
    a = cast(inputs(op, gen, sum(lens)), BF16)
    cache = randn(gen, 4, *state_tail(op, a), scale=0.5).to(BF16)
    rows = torch.tensor([3, 0], dtype=torch.int32)
    (y, c), (wy, wc), (by, bc) = both(op, BF16, **a, initial_state=cache, state_indices=rows,
                                      cu_seqlens=cu_of(lens), output_final_state=True)
    assert y.dtype == BF16 and c.dtype == BF16
    check(y, wy, by, BF16)
    check(c, wc, bc, BF16)


@pytest.mark.parametrize("op", SEQ_OPS)
def test_no_tokens(op):
    """T = 0: empty outputs; the final states are the initial ones (a cache row rewritten as it was)."""
    gen = torch.Generator().manual_seed(4)
    a = cast(inputs(op, gen, 0), F32)
    init = randn(gen, 2, *state_tail(op, a)).float()
    y, final = direct(op, dict(a, initial_state=init, cu_seqlens=cu_of([0, 0]), output_final_state=True))
    assert y.shape[0] == 0 and torch.equal(final, init)
    y, final = direct(op, dict(a, initial_state=init.clone(), output_final_state=False))
    assert final is None


@pytest.mark.parametrize("op", SEQ_OPS)
def test_jit(op):
    """Every function traces under an outer jax.jit (no host round trips on array values)."""
    gen = torch.Generator().manual_seed(6)
    lens = [5, 0, C + 2]
    a = cast(inputs(op, gen, sum(lens)), F32)
    cache = randn(gen, 4, *state_tail(op, a), scale=0.5).float()
    arrays = {n: to_jax(v) for n, v in a.items() if isinstance(v, torch.Tensor)}
    static = {n: v for n, v in a.items() if not isinstance(v, torch.Tensor)}
    idx = jnp.asarray([2, -1, 0], jnp.int32)
    f = jax.jit(lambda arr, cache, cu: FUNCS[op](**arr, **static, initial_state=cache, state_indices=idx,
                                                 cu_seqlens=cu, output_final_state=True))
    y, c = f(arrays, to_jax(cache), to_jax(cu_of(lens)))
    eager = direct(op, dict(a, initial_state=cache.clone(), state_indices=torch.tensor([2, -1, 0], dtype=torch.int32),
                            cu_seqlens=cu_of(lens), output_final_state=True))
    assert torch.equal(to_torch(y, eager[0].dtype), eager[0]) and torch.equal(to_torch(c, F32), eager[1])


STEP_OPS = ("linear_attention_step", "gated_delta_rule_step", "ssd_step", "causal_conv1d_step")


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_default_rows_bf16_state(op):
    """Without state_indices a step updates rows arange(bsz) of the state (bf16 here); later rows stay."""
    gen = torch.Generator().manual_seed(7)
    seq_op = op[:-len("_step")]
    a = cast(inputs(seq_op, gen, 3, gate="key" if seq_op == "linear_attention" else "head"), BF16)
    state = randn(gen, 5, *state_tail(seq_op, a), scale=0.5).to(BF16)
    (y, s), (wy, ws), (by, bs) = both(op, BF16, **a, state=state)
    check(y, wy, by, BF16)
    check(s, ws, bs, BF16)
    assert torch.equal(s[3:], state[3:])


@pytest.mark.parametrize("blocks", TPU_BLOCKS, ids=str)
@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule"])
def test_tpu_block_sizes_run(op, blocks, monkeypatch):
    """The TPU table's chunk and sub-chunk sizes (only lowered elsewhere) give the right answer in interpret
    mode: per-key decays (every sub-chunk path), two sequences over chunks with a ragged tail."""
    monkeypatch.setattr(tuning, "recurrent", lambda gen=None: blocks)
    gen = torch.Generator().manual_seed(9)
    lens = [blocks.chunk + 9, 5]
    a = cast(inputs(op, gen, sum(lens), gate="key"), F32)
    init = randn(gen, 2, *state_tail(op, a)).float()
    (y, s), (wy, ws), (by, bs) = both(op, **a, initial_state=init, cu_seqlens=cu_of(lens), output_final_state=True)
    check(y, wy, by, F32)
    check(s, ws, bs, F32)


# ---- the blocked triangular inverse against float64 algebra -----------------------------------------

def test_unit_lower_inverse():
    rng = np.random.default_rng(8)
    for c in (32, 64, 128):
        n = np.tril(rng.standard_normal((c, c)) * 0.3, -1)
        t = np.asarray(chunk.unit_lower_inverse(jnp.asarray(n, jnp.float32)), np.float64)
        assert np.abs(t @ (np.eye(c) + n) - np.eye(c)).max() < 1e-4


# ---- lowering for the TPU -------------------------------------------------------------------------

def _structs(op, T=300, nseq=3):
    """ShapeDtypeStructs of a varlen call with a state cache."""
    S = jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    cu, idx = S((nseq + 1,), i32), S((nseq,), i32)
    if op == "linear_attention":
        return (S((T, 2, 64), bf), S((T, 2, 64), bf), S((T, 2, 128), bf)), S((5, 2, 64, 128), f32), cu, idx
    if op == "gated_delta_rule":
        return (S((T, 2, 128), bf), S((T, 2, 128), bf), S((T, 4, 128), bf)), S((5, 4, 128, 128), f32), cu, idx
    return (S((T, 4, 64), bf), S((T, 4), f32), S((4,), f32), S((T, 1, 128), bf), S((T, 1, 128), bf)), \
        S((5, 4, 64, 128), f32), cu, idx


@pytest.mark.parametrize("blocks", TPU_BLOCKS, ids=str)
@pytest.mark.parametrize("op,gate", [("linear_attention", None), ("linear_attention", "head"),
                                     ("linear_attention", "key"), ("gated_delta_rule", "head"),
                                     ("gated_delta_rule", "key"), ("ssd", "head")])
def test_lowers_for_tpu(op, gate, blocks, monkeypatch):
    monkeypatch.setattr(chunk, "interpret", lambda: None)          # compile for the TPU, not interpret
    args, cache, cu, idx = _structs(op)
    S = jax.ShapeDtypeStruct
    T = args[0].shape[0]
    if op == "linear_attention":
        g = None if gate is None else S((T, 2) if gate == "head" else (T, 2, 64), jnp.float32)

        def f(q, k, v, g, cache, cu, idx):
            return linear._linear_attention(q, k, v, g, cache, idx, None, cu, scale=0.125, output_final_state=True,
                                            blocks=blocks)
        structs = (*args, g, cache, cu, idx)
    elif op == "gated_delta_rule":
        def f(q, k, v, g, beta, cache, cu, idx):
            return delta._gated_delta_rule(q, k, v, g, beta, cache, idx, None, cu, scale=0.1, output_final_state=True,
                                           use_qk_l2norm=True, blocks=blocks)
        structs = (*args, S((T, 4) if gate == "head" else (T, 4, 128), jnp.float32), S((T, 4), jnp.float32),
                   cache, cu, idx)
    else:
        def f(x, dt, A, B, C, cache, cu, idx):
            return ssd._ssd(x, dt, A, B, C, None, None, None, cache, idx, None, cu, dt_softplus=True,
                            dt_limit=(0.0, float("inf")), output_final_state=True, blocks=blocks)
        structs = (*args, cache, cu, idx)
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*structs)
    assert "tpu_custom_call" in exported.mlir_module()
