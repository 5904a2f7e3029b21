"""The triton backend's chunked sequence forms (chunk.py: linear_attention / GLA, gated_delta_rule / KDA,
ssd), run by Triton's interpreter on the CPU, beyond what the conformance suite covers: several chunks
with a ragged last one and several key/value blocks (also with chunks of 32 and 64, which take the
per-key-dim sub-chunk path), non-contiguous inputs and `out=`, a bfloat16 state cache, T = 0, strong
per-key-dim decays, bad unchecked state indices, and the kernels lowered for GPU targets.

Skipped unless the process was started with TRITON_INTERPRET=1 (see test_decode_sparse_triton.py):
    TRITON_INTERPRET=1 pytest -x -q tests/backends/triton/test_chunked_triton.py
Results are compared with the float64 reference by the conformance tolerance.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.backends.triton.child import skip_unless_interpreting

skip_unless_interpreting()

import portable_attn as pa  # noqa: E402
from portable_attn.backend import Call  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.platforms import Platform  # noqa: E402
from portable_attn.backends.reference.precision import emulate  # noqa: E402

from portable_attn.backends.triton import support, tuning  # noqa: E402
from tests.backends.triton.child import VENDORS, assert_lowers, assert_survives  # noqa: E402

# float16 runs the bfloat16 kernels' paths (tl.dot on 16-bit inputs) with another store format: the conformance
# entry checks it on every op; here, under the interpreter, each dtype costs minutes of CI
DTYPES = (torch.float32, torch.bfloat16)


def with_chunk(monkeypatch, chunk):
    """The interpreter's launch entry with another chunk length (32, 64: several sub-chunks of 16)."""
    e = tuning.RECURRENT["interpret"]
    monkeypatch.setitem(tuning.RECURRENT, "interpret", dataclasses.replace(e, chunk=chunk))


def rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def clone(kw):
    return {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def up(kw):
    return {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}


def check(op, dtype, **kw):
    """Run `op` on triton with its outputs poisoned, compare the output and the final state (or the state
    cache) with the float64 reference within the conformance tolerance; returns the triton outputs."""
    cache = kw.get("state_indices") is not None
    out = kw.pop("out", None)
    mine = clone(kw)
    if out is None:
        lead = kw["x" if op == "ssd" else "v"]
        out = torch.full(lead.shape, float("nan"), dtype=dtype)
    o, final = getattr(pa, op)(**mine, out=out, backend="triton")
    assert o is out and not torch.isnan(o).any()
    exact = getattr(pa, op)(**up(clone(kw)), backend="reference")
    low_kw = clone(kw)
    with emulate(dtype):
        low = getattr(pa, op)(**low_kw, backend="reference")
    got = {"out": o, "state": mine["initial_state"] if cache else final}
    ref = {"out": exact[0], "state": exact[1]}
    emu = {"out": low[0], "state": low_kw["initial_state"] if cache else low[1]}
    if cache:
        ref["state"] = ref["state"].to(kw["initial_state"].dtype)  # the reference writes its (float64) copy
    for name in ("out", "state") if got["state"] is not None else ("out",):
        v = compare(got[name], ref[name], emu[name], dtype)
        assert v.ok, f"{op} {name}: {v.detail or f'err {v.err:.3g} > tol {v.tol:.3g}'}"
    return o, final, mine


def linear_inputs(g, t, h, k, v, gate, dtype, strong=False):
    kw = {"q": rand(g, t, h, k, dtype=dtype), "k": rand(g, t, h, k, dtype=dtype, scale=k ** -0.5),
          "v": rand(g, t, h, v, dtype=dtype)}
    if gate == "head":
        kw["g"] = -rand(g, t, h, scale=0.3).abs()
    elif gate == "key":
        kw["g"] = -rand(g, t, h, k, scale=0.3).abs() - (20.0 if strong else 0.0)
    return kw


def delta_inputs(g, t, h, hv, k, v, gate, dtype, strong=False):
    kw = {"q": rand(g, t, h, k, dtype=dtype), "k": rand(g, t, h, k, dtype=dtype), "v": rand(g, t, hv, v, dtype=dtype),
          "g": -rand(g, t, hv, k, scale=0.2).abs() if gate == "key" else -rand(g, t, hv, scale=0.2).abs(),
          "beta": torch.sigmoid(rand(g, t, hv)), "use_qk_l2norm": True}
    if strong:
        kw["g"] = kw["g"] - 20.0
    return kw


def ssd_inputs(g, t, h, groups, p, n, dtype, d_shape=(), z=True):
    kw = {"x": rand(g, t, h, p, dtype=dtype), "dt": rand(g, t, h, scale=0.5), "A": -rand(g, h, scale=0.5).exp(),
          "B": rand(g, t, groups, n, dtype=dtype), "C": rand(g, t, groups, n, dtype=dtype),
          "D": rand(g, h, *d_shape), "dt_bias": rand(g, h, scale=0.3), "dt_softplus": True, "dt_limit": (0.0, 2.0)}
    if z:
        kw["z"] = rand(g, t, h, p, dtype=dtype)
    return kw


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


# ---- chunks, ragged tails, key/value blocks ---------------------------------------------------------

LENS = [37, 0, 70, 5]   # several chunks, a ragged last chunk, an empty sequence


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [None, "head", "key"])
def test_linear_attention_blocks(monkeypatch, gate, dtype, chunk):
    """K = 40, V = 36: three key and three value blocks of 16 (masked tails); packed, initial states."""
    with_chunk(monkeypatch, chunk)
    g = torch.Generator().manual_seed(1)
    kw = linear_inputs(g, sum(LENS), 2, 40, 36, gate, dtype)
    check("linear_attention", dtype, **kw, cu_seqlens=cu(LENS), initial_state=rand(g, 4, 2, 40, 36, scale=0.5),
          output_final_state=True)


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["head", "key"])
def test_gated_delta_rule_blocks(monkeypatch, gate, dtype, chunk):
    """Hv = 4 value heads on H = 2, K = 40 (one padded whole-key tile of 64), V = 36 (three blocks)."""
    with_chunk(monkeypatch, chunk)
    g = torch.Generator().manual_seed(2)
    kw = delta_inputs(g, sum(LENS), 2, 4, 40, 36, gate, dtype)
    check("gated_delta_rule", dtype, **kw, cu_seqlens=cu(LENS), initial_state=rand(g, 4, 4, 40, 36, scale=0.5),
          output_final_state=True)


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ssd_blocks(monkeypatch, dtype, chunk):
    """P = 36 (three blocks), N = 40 (three key blocks), 4 heads on 2 groups, D per (head, P), z."""
    with_chunk(monkeypatch, chunk)
    g = torch.Generator().manual_seed(3)
    kw = ssd_inputs(g, sum(LENS), 4, 2, 36, 40, dtype, d_shape=(36,))
    check("ssd", dtype, **kw, cu_seqlens=cu(LENS), initial_state=rand(g, 4, 4, 36, 40, scale=0.5),
          output_final_state=True)


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule"])
def test_strong_per_key_decay(monkeypatch, op):
    """Per-key-dim log-decays near -20 per token (a chunk sums to about -1300): no overflow, with the
    sub-chunk path (chunk 64)."""
    with_chunk(monkeypatch, 64)
    g = torch.Generator().manual_seed(4)
    if op == "linear_attention":
        kw = linear_inputs(g, 80, 2, 16, 16, "key", torch.float32, strong=True)
    else:
        kw = delta_inputs(g, 80, 2, 2, 16, 16, "key", torch.float32, strong=True)
    o, final, _ = check(op, torch.float32, **kw, output_final_state=True)
    assert torch.isfinite(final).all()


# ---- strides, out=, caches, empty inputs -------------------------------------------------------------

def test_non_contiguous_inputs_and_out():
    """Inputs as strided views (heads-major buffers, every other feature), `out` a transposed view."""
    g = torch.Generator().manual_seed(5)
    t, h, k, v = 45, 2, 16, 24
    q = rand(g, h, t, 2 * k).transpose(0, 1)[:, :, ::2]
    kk = rand(g, h, t, k, scale=k ** -0.5).transpose(0, 1)
    vv = rand(g, t, 2 * h, v)[:, ::2]
    gate = -rand(g, h, t, k, scale=0.3).abs().transpose(0, 1)
    out = torch.full((h, t, v), float("nan")).transpose(0, 1)
    state = rand(g, 3, h, v, k).transpose(-1, -2)   # [S, H, K, V] view of a [S, H, V, K] buffer
    check("linear_attention", torch.float32, q=q, k=kk, v=vv, g=gate, out=out, initial_state=state[1:2],
          output_final_state=True)
    x = rand(g, h, t, 8).transpose(0, 1)
    B, C = rand(g, t, 2, 16)[:, :1], rand(g, 16, t, 1).permute(1, 2, 0)
    check("ssd", torch.float32, x=x, dt=rand(g, h, t).t(), A=-rand(g, 2 * h)[::2].abs(), B=B, C=C,
          dt_limit=(0.0, float("inf")))
    check("gated_delta_rule", torch.float32, q=q, k=kk, v=vv, g=-rand(g, h, t).abs().t(),
          beta=rand(g, h, t).sigmoid().t())


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "ssd"])
def test_bf16_state_cache(op):
    """A bfloat16 state cache with permuted rows, a -1 and has_initial_state: rows written in place in
    bfloat16, rows not listed bit-identical."""
    g = torch.Generator().manual_seed(6)
    lens = [20, 9, 33]
    if op == "linear_attention":
        kw, tail = linear_inputs(g, sum(lens), 2, 16, 24, "key", torch.bfloat16), (2, 16, 24)
    elif op == "gated_delta_rule":
        kw, tail = delta_inputs(g, sum(lens), 2, 2, 16, 24, "head", torch.bfloat16), (2, 16, 24)
    else:
        kw, tail = ssd_inputs(g, sum(lens), 2, 1, 24, 16, torch.bfloat16), (2, 24, 16)
    cache = rand(g, 6, *tail, dtype=torch.bfloat16, scale=0.5)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    has = torch.tensor([True, True, False])
    _, final, mine = check(op, torch.bfloat16, **kw, cu_seqlens=cu(lens), initial_state=cache, state_indices=idx,
                           has_initial_state=has, output_final_state=True)
    after = mine["initial_state"]
    assert final is after and after.dtype == torch.bfloat16
    assert torch.equal(after[[0, 2, 3, 5]], cache[[0, 2, 3, 5]])
    assert not torch.equal(after[[1, 4]], cache[[1, 4]])


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "ssd"])
def test_no_tokens(op):
    """T = 0: empty outputs; final states pass the initial ones through (zero where not read)."""
    g = torch.Generator().manual_seed(7)
    if op == "linear_attention":
        kw, tail = linear_inputs(g, 0, 2, 16, 24, "head", torch.float32), (2, 16, 24)
    elif op == "gated_delta_rule":
        kw, tail = delta_inputs(g, 0, 2, 2, 16, 24, "head", torch.float32), (2, 16, 24)
    else:
        kw, tail = ssd_inputs(g, 0, 2, 1, 24, 16, torch.float32), (2, 24, 16)
    init = rand(g, 2, *tail)
    o, final = getattr(pa, op)(**kw, cu_seqlens=torch.zeros(3, dtype=torch.int32), initial_state=init,
                               output_final_state=True, backend="triton")
    assert o.shape[0] == 0 and torch.equal(final, init)
    cache = rand(g, 3, *tail)
    before = cache.clone()
    getattr(pa, op)(**kw, cu_seqlens=torch.zeros(3, dtype=torch.int32), initial_state=cache,
                    state_indices=torch.tensor([2, 0], dtype=torch.int32),
                    has_initial_state=torch.tensor([True, False]), backend="triton")
    assert torch.equal(cache[[1, 2]], before[[1, 2]]) and torch.equal(cache[0], torch.zeros_like(cache[0]))


def test_bad_state_indices_never_fault():
    """With PORTABLE_ATTN_CHECK=0, state rows out of range and cu_seqlens past the tokens run to the end
    (in a child process: a fault there fails this test, not the run)."""
    assert_survives("""
        import torch, portable_attn as pa
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(20, 2, 16, generator=g) for _ in range(3))
        cache = torch.randn(3, 2, 16, 16, generator=g)
        idx = torch.tensor([7, -5, 2], dtype=torch.int32)
        cu = torch.tensor([0, 9, 400, 20], dtype=torch.int32)
        gk = -torch.rand(20, 2, 16, generator=g)
        pa.linear_attention(q, k, v, g=gk, initial_state=cache, state_indices=idx, cu_seqlens=cu, backend="triton")
        pa.gated_delta_rule(q, k, v, -torch.rand(20, 2, generator=g), torch.rand(20, 2, generator=g),
                            initial_state=cache, state_indices=idx, cu_seqlens=cu, backend="triton")
        B = torch.randn(20, 1, 16, generator=g)
        pa.ssd(v, torch.rand(20, 2, generator=g), -torch.rand(2, generator=g), B, B, initial_state=cache,
               state_indices=idx, cu_seqlens=torch.tensor([0, 30, 5, 20], dtype=torch.int32), backend="triton")
    """)


def test_support_reasons():
    """The delta rule refuses K above 256 (a whole-key state tile); linear attention and SSD split any dims."""
    def call(op, **a):
        return Call(op, a, Platform.CUDA)
    big = torch.empty(1, 1, 300, dtype=torch.bfloat16)
    assert "K = 300" in support.why_not(call("gated_delta_rule", q=big, v=big))
    assert support.why_not(call("linear_attention", q=big, v=big)) is None
    assert support.why_not(call("ssd", x=big, B=big)) is None


# ---- the compiled kernels -----------------------------------------------------------------------------

@pytest.mark.parametrize("vendor", VENDORS)
def test_kernels_compile_for_gpu_targets(vendor):
    """Lower every chunk kernel (each constexpr path) for a GPU target (tests/backends/triton/lowering.py)."""
    assert_lowers(vendor, """
        from portable_attn.backends.triton import chunk, delta as delta_rule

        def sig(fn, act, fp32=(), i32p=(), i1p=(), floats=("lo", "hi", "scale"), state="fp32"):
            s = {}
            for p in fn.params:
                n = p.name
                if p.is_constexpr:
                    s[n] = "constexpr"
                elif n in floats:
                    s[n] = "fp32"
                elif n in i32p:
                    s[n] = "*i32"
                elif n in i1p:
                    s[n] = "*i1"
                elif n in ("H0", "HT"):
                    s[n] = "*" + state
                elif n in fp32:
                    s[n] = "*fp32"
                elif n[0].isupper() and n not in ("T", "H", "K", "V", "NC", "NSLOTS", "NSEQ"):
                    s[n] = "*" + act
                else:
                    s[n] = "i32"
            return s

        # every constexpr path in bfloat16; float16 and float32 (IEEE dots, no hi/lo split) on a few
        paths = [(0, False, False), (1, False, False), (2, False, False), (1, True, False), (1, False, True),
                 (2, False, True)]
        runs = []
        for act, gates in (("bf16", paths), ("fp16", paths[3:4]), ("fp32", paths[4:])):
            for i, (gate, ssd, delta) in enumerate(gates):
                varlen, init, final = ((False, 0, 1), (True, 2, 2), (True, 1, 0))[i % 3]
                gate_off = ["G_"] if gate == 0 or ssd else []
                ssd_off = [] if ssd else ["DT", "DTB", "A_"]
                packed_off = [] if varlen else ["CU", "OFFS", "SEQ"]
                fn = chunk._chunk_state
                s, c = (sig(fn, act, fp32=("G_", "DT", "DTB", "A_", "U_"), i32p=("IDX", "CU", "OFFS"), i1p=("HAS",),
                            state="bf16" if init == 2 else "fp32"),
                        dict(GROUP=2, GATE=gate, SSD=ssd, SOFTPLUS=ssd, HAS_BIAS=ssd, DELTA=delta, VARLEN=varlen,
                             INIT=init, HAS_FLAG=init == 2, FINAL=final, C=64, BK=128 if delta else 64, BV=64))
                absent(s, c, gate_off + ssd_off + packed_off[:2] + (["V_"] if delta else ["W_", "U_", "VNEW"])
                       + ["H0"] * (init == 0) + ["IDX", "HAS"] * (init != 2) + ["HT"] * (final == 0))
                runs.append((fn, s, c))
                fn = chunk._chunk_output
                s, c = (sig(fn, act, fp32=("G_", "DT", "DTB", "A_", "D_"), i32p=("CU", "OFFS", "SEQ")),
                        dict(GROUP=2, GATE=gate, SSD=ssd, SOFTPLUS=ssd, HAS_BIAS=ssd, HAS_D=ssd, HAS_Z=ssd,
                             VARLEN=varlen, C=64, BK=64, BV=64, SUB_=16))
                absent(s, c, gate_off + ssd_off + packed_off + ([] if ssd else ["D_", "Z_"]))
                runs.append((fn, s, c))
                if delta:
                    fn = delta_rule._delta_wy
                    s, c = (sig(fn, act, fp32=("G_", "BETA", "U_"), i32p=("CU", "OFFS", "SEQ")),
                            dict(GROUP=2, GATE=gate, VARLEN=varlen, C=64, BK=64, BV=64, SUB_=16))
                    absent(s, c, packed_off)
                    runs.append((fn, s, c))
            runs.append((delta_rule._l2norm, sig(delta_rule._l2norm, act), dict(BT=32, BK=128)))
    """, {"num_warps": 4, "num_stages": 2 if vendor == "cuda" else 1}, timeout=1500)
