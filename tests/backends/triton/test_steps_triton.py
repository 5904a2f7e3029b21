"""The triton step forms (steps.py: linear_attention_step, gated_delta_rule_step, ssd_step) and
causal_conv1d with its step (conv.py), run by Triton's interpreter on the CPU.

Skipped unless the process was started with TRITON_INTERPRET=1 (Triton fixes its mode when a kernel
is decorated): `TRITON_INTERPRET=1 pytest -n 2 tests/backends/triton`. Every result is compared with
the float64 reference (`backend="reference"`) by the conformance tolerance, outputs poisoned (NaN)
before the call, caches checked bit-identical outside the rows a call lists. Covers permuted and -1
state_indices, bf16 and strided caches, several value blocks, grouped heads, W = 1, varlen conv with
sequences shorter than W-1 and empty ones, bad unchecked indices (child process) and the lowering of
every kernel for sm_90 and gfx942.
"""
from __future__ import annotations


import pytest
import torch

from tests.backends.triton.child import skip_unless_interpreting

skip_unless_interpreting()

import portable_attn as pa  # noqa: E402
from portable_attn.backends.triton import tuning  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.backends.reference.precision import emulate  # noqa: E402
from tests.backends.triton.child import VENDORS, assert_lowers, assert_survives  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# float16 runs the bfloat16 kernels' paths (tl.dot on 16-bit inputs) with another store format: the conformance
# entry checks it on every op, and test_step_default_rows_transposed_cache here; under the interpreter each
# dtype costs minutes of CI
DTYPES = (F32, BF16)
NAN = float("nan")
TILES = tuning.RECURRENT["interpret"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, scale=1.0, dtype=F32):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def strided_view(x):
    """x's values in a view that skips every other element of its last axis (NaN between)."""
    buf = torch.full(x.shape[:-1] + (2 * x.shape[-1],), NAN, dtype=x.dtype)
    buf[..., 1::2] = x
    return buf[..., 1::2]


def check(op, kw, dtype, cache_name):
    """Run `op` on the triton backend (out= poisoned and strided) and on the reference, exact and
    emulating `dtype`; the output and the cache must agree, rows not listed must stay bit-identical.
    Returns the triton result."""
    def copy(up):
        return {n: (x.clone().double() if up and x.is_floating_point() else x.clone())
                if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    exact_kw, low_kw = copy(True), copy(False)
    exact = getattr(pa, op)(**exact_kw, backend="reference")
    with emulate(dtype):
        low = getattr(pa, op)(**low_kw, backend="reference")
    seq = isinstance(exact, tuple)
    ref_out = exact[0] if seq else exact
    out = strided_view(torch.full(ref_out.shape, NAN, dtype=dtype))
    cache = kw[cache_name]
    before = cache.clone()
    got = getattr(pa, op)(**kw, out=out, backend="triton")
    o = got[0] if seq else got
    assert o is out and o.dtype == dtype
    for name, g, e, lw in (("out", o, ref_out, low[0] if seq else low),
                           (cache_name, cache, exact_kw[cache_name], low_kw[cache_name])):
        v = compare(g, e, lw, dtype)
        assert v.ok, f"{op} {name}: {v.detail or f'err {v.err:.3g} > tol {v.tol:.3g}'}"
    idx = kw.get("state_indices")
    if idx is not None:
        unlisted = sorted(set(range(cache.shape[0])) - set(idx.tolist()))
        assert torch.equal(cache[unlisted], before[unlisted])
    return got


def cache_rows(g, bsz, slots, skip=(0,)):
    rows = torch.randperm(slots, generator=g)[:bsz].to(torch.int32)
    rows[list(skip)] = -1
    return rows


# ---- step forms -------------------------------------------------------------------------------

K, V = 24, 40  # K not a power of two (masked rows); V spans three value blocks of the interpreter's 16


def test_tiles_span_several_value_blocks():
    assert TILES.block_v < V / 2 and max(TILES.block_c, TILES.step_block_c) < 40 and TILES.block_t < 9


def step_inputs(op, g, bsz, dtype, variant):
    if op == "linear_attention_step":
        h = 3
        gate = {"none": None, "head": -rand(g, bsz, h).abs(), "key": -rand(g, bsz, h, K, scale=0.3).abs()}[variant]
        return dict(q=rand(g, bsz, h, K, dtype=dtype), k=rand(g, bsz, h, K, scale=K ** -0.5, dtype=dtype),
                    v=rand(g, bsz, h, V, dtype=dtype), g=gate), (h, K, V)
    if op == "gated_delta_rule_step":
        h, hv = 2, 6
        gate = -rand(g, bsz, hv, K, scale=0.2).abs() if variant == "key" else -rand(g, bsz, hv, scale=0.2).abs()
        q, k = rand(g, bsz, h, K, dtype=dtype), rand(g, bsz, h, K, dtype=dtype)
        if variant == "no_l2norm":
            q, k = (x / x.float().norm(dim=-1, keepdim=True).to(dtype) for x in (q, k))
        return dict(q=q, k=k, v=rand(g, bsz, hv, V, dtype=dtype), g=gate, beta=torch.rand(bsz, hv, generator=g),
                    use_qk_l2norm=variant != "no_l2norm", scale=0.7), (hv, K, V)
    h, grp, n = 6, 2, 24
    kw = dict(x=rand(g, bsz, h, V, dtype=dtype), dt=rand(g, bsz, h, scale=0.5), A=-rand(g, h).exp(),
              B=rand(g, bsz, grp, n, dtype=dtype), C=rand(g, bsz, grp, n, dtype=dtype))
    if variant == "full":
        kw.update(D=rand(g, h, V), z=rand(g, bsz, h, V, dtype=dtype), dt_bias=rand(g, h, scale=0.3),
                  dt_softplus=True, dt_limit=(0.05, 0.8))
    elif variant == "d_head":  # no softplus: negative dt are clamped to the default low limit 0
        kw.update(D=rand(g, h))
    return kw, (h, V, n)


STEP_CASES = [("linear_attention_step", v) for v in ("none", "head", "key")] + \
             [("gated_delta_rule_step", v) for v in ("head", "key", "no_l2norm")] + \
             [("ssd_step", v) for v in ("full", "d_head", "plain")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,variant", STEP_CASES)
def test_step_against_reference(op, variant, dtype):
    """Permuted rows with -1s over a strided cache (bf16 for bf16 activations, else float32)."""
    g = gen(STEP_CASES.index((op, variant)))
    bsz, slots = 5, 9
    kw, tail = step_inputs(op, g, bsz, dtype, variant)
    state_dtype = BF16 if dtype == BF16 else F32
    buf = rand(g, slots, *tail, 2, scale=0.5, dtype=state_dtype)
    before = buf.clone()
    kw.update(state=buf[..., 1], state_indices=cache_rows(g, bsz, slots, skip=(0, 3)))
    check(op, kw, dtype, "state")
    assert torch.equal(buf[..., 0], before[..., 0])  # the buffer around the view


@pytest.mark.parametrize("op", ["linear_attention_step", "gated_delta_rule_step", "ssd_step"])
def test_step_default_rows_transposed_cache(op):
    """state_indices defaults to arange(bsz) over a larger cache whose last two axes are transposed
    in memory; deterministic."""
    g = gen(8)
    bsz, slots = 4, 6
    kw, tail = step_inputs(op, g, bsz, F16, "key" if op != "ssd_step" else "full")
    kw["state"] = rand(g, slots, tail[0], tail[2], tail[1], scale=0.5).transpose(2, 3)
    again = {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    got = check(op, kw, F16, "state")
    assert torch.equal(getattr(pa, op)(**again, backend="triton"), got)
    assert torch.equal(again["state"], kw["state"])


def test_empty_batch():
    """No sequences: nothing launched, nothing written."""
    g = gen(9)
    for op, variant in (("linear_attention_step", "key"), ("ssd_step", "full")):
        kw, tail = step_inputs(op, g, 0, F32, variant)
        state = rand(g, 2, *tail)
        before = state.clone()
        assert getattr(pa, op)(**kw, state=state, backend="triton").shape[0] == 0
        assert torch.equal(state, before)
    state = rand(g, 2, 8, 3)
    assert pa.causal_conv1d_step(rand(g, 0, 8), rand(g, 8, 4), state=state, backend="triton").shape == (0, 8)


# ---- causal_conv1d ----------------------------------------------------------------------------

def conv_inputs(g, t, ch, w, dtype, bias=True, act="silu", wdtype=F32):
    return dict(x=rand(g, t, ch, dtype=dtype), weight=rand(g, ch, w, scale=w ** -0.5, dtype=wdtype),
                bias=rand(g, ch, dtype=wdtype) if bias else None, activation=act)


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", [1, 2, 4, 5])
def test_conv_varlen_cache(w, dtype):
    """Sequences shorter than W-1, empty ones (first and last), sequences crossing token tiles, a
    cache of permuted rows with a -1 and has_initial_state; strided x and cache."""
    g = gen(20 + w)
    lens = [0, 1, 2, 13, 0, 3, 21, 0]
    ch, slots = 40, 11
    kw = conv_inputs(g, sum(lens), ch, w, dtype, wdtype=dtype if w == 4 else F32)
    kw["x"] = strided_view(kw["x"])
    buf = rand(g, slots, ch, w - 1, 2, dtype=dtype)
    kw.update(initial_state=buf[..., 0], state_indices=cache_rows(g, len(lens), slots, skip=(2,)),
              has_initial_state=torch.rand(len(lens), generator=g) < 0.6, cu_seqlens=cu_of(lens),
              output_final_state=True)
    kw["has_initial_state"][[0, 1]] = torch.tensor([False, True])
    before = buf.clone()
    out, final = check("causal_conv1d", kw, dtype, "initial_state")
    assert final is kw["initial_state"]
    assert torch.equal(buf[..., 1], before[..., 1])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("state", ["initial", "none"])
def test_conv_new_final_state(state, dtype):
    """Without a cache the final state is a new tensor: in initial_state's dtype (float32 here), else
    the activation dtype; no bias, no activation; one sequence without cu_seqlens too."""
    g = gen(30)
    lens, ch, w = [5, 1, 0, 19], 24, 4
    for cu in (cu_of(lens), None):
        nseq = len(lens) if cu is not None else 1
        kw = conv_inputs(g, sum(lens), ch, w, dtype, bias=False, act=None)
        init = rand(g, nseq, ch, w - 1) if state == "initial" else None
        got_init = init.clone() if init is not None else None
        out, final = pa.causal_conv1d(**kw, initial_state=got_init, cu_seqlens=cu, output_final_state=True,
                                      backend="triton")
        ref_kw = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        want, want_final = pa.causal_conv1d(**ref_kw, initial_state=None if init is None else init.double(),
                                            cu_seqlens=cu, output_final_state=True, backend="reference")
        assert final.dtype == (F32 if state == "initial" else dtype)
        assert final.shape == (nseq, ch, w - 1)
        tol = 1e-5 if dtype == F32 else 3e-2
        assert float((out.double() - want).abs().max()) <= tol * float(want.abs().max())
        assert float((final.double() - want_final).abs().max()) <= tol * float(want_final.abs().max())
        if init is not None:  # no cache: the initial state stays as it was
            assert torch.equal(got_init, init)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["strided", "dense"])
def test_conv_step(layout, w, dtype):
    """W = 1 (a state [slots, C, 0]) to 5, channels over several blocks (the last one ragged), permuted rows
    with -1; a strided cache, or dense rows [C, W-1] (the kernel's compile-time offsets) with a gap between
    them. The buffer around the cache stays bit-identical."""
    g = gen(40 + w)
    bsz, ch, slots = 5, 40, 8
    kw = conv_inputs(g, bsz, ch, w, dtype, bias=w != 2, act="silu" if w != 2 else None)
    if layout == "strided":
        buf = rand(g, slots, ch, w - 1, 2, dtype=dtype)
        state, rest = buf[..., 1], buf[..., 0]
    else:
        buf = rand(g, slots, ch + 1, w - 1, dtype=dtype)
        state, rest = buf[:, :ch], buf[:, ch:]
    before = rest.clone()
    kw.update(state=state, state_indices=cache_rows(g, bsz, slots, skip=(1, 4)))
    check("causal_conv1d_step", kw, dtype, "state")
    assert torch.equal(rest, before)


def test_conv_steps_equal_sequence():
    """causal_conv1d_step token by token == causal_conv1d over the sequence, bitwise states."""
    g = gen(50)
    t, ch, w = 7, 24, 4
    kw = conv_inputs(g, t, ch, w, F32)
    init = rand(g, 1, ch, w - 1)
    out, final = pa.causal_conv1d(**kw, initial_state=init, output_final_state=True, backend="triton")
    cache = torch.zeros(3, ch, w - 1)
    cache[2] = init[0]
    idx = torch.tensor([2], dtype=torch.int32)
    for i in range(t):
        y = pa.causal_conv1d_step(kw["x"][i:i + 1], kw["weight"], kw["bias"], state=cache, state_indices=idx,
                                  activation="silu", backend="triton")
        assert float((y[0] - out[i]).abs().max()) <= 1e-6
    assert torch.equal(cache[2], final[0]) and not bool(cache[:2].any())


# ---- torch.compile ----------------------------------------------------------------------------

def test_compile_fullgraph_decode_step():
    """A decode step over every step form and a conv prefill traces with fullgraph=True as the
    portable_attn custom ops and matches eager, caches updated in place."""
    torch._dynamo.reset()
    g = gen(60)
    la, _ = step_inputs("linear_attention_step", g, 3, BF16, "key")
    gdr, _ = step_inputs("gated_delta_rule_step", g, 3, BF16, "head")
    ssd, _ = step_inputs("ssd_step", g, 3, BF16, "full")
    conv = conv_inputs(g, 9, 24, 4, BF16)
    rows = torch.tensor([2, -1, 0], dtype=torch.int32)
    caches = {"la": rand(g, 4, 3, K, V, dtype=BF16), "gdr": rand(g, 4, 6, K, V), "ssd": rand(g, 4, 6, V, 24),
              "conv": rand(g, 4, 24, 3, dtype=BF16)}

    def step(c):
        a = pa.linear_attention_step(**la, state=c["la"], state_indices=rows, backend="triton")
        b = pa.gated_delta_rule_step(**gdr, state=c["gdr"], backend="triton")
        d = pa.ssd_step(**ssd, state=c["ssd"], state_indices=rows, backend="triton")
        y, _ = pa.causal_conv1d(**conv, initial_state=c["conv"], state_indices=rows[:2],
                                cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), backend="triton")
        e = pa.causal_conv1d_step(conv["x"][:3], conv["weight"], state=c["conv"], state_indices=rows,
                                  backend="triton")
        return a, b, d, y, e

    eager = {n: x.clone() for n, x in caches.items()}
    want = step(eager)
    got = torch.compile(step, fullgraph=True, backend="eager")(caches)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for name in caches:
        assert torch.equal(caches[name], eager[name])


# ---- bad unchecked indices: a wrong answer at worst, never a fault -------------------------------

def test_bad_state_indices_never_fault():
    """With PORTABLE_ATTN_CHECK=0, rows far outside the cache (and below -1) read nothing and write
    nothing, and cu_seqlens past the tokens reads nothing outside x (in a child process: a fault there
    fails this test, not the run)."""
    assert_survives("""
        import torch, portable_attn as pa
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)
        bad = torch.tensor([10 ** 6, -5, 2 ** 30], dtype=torch.int32)
        st = r(4, 2, 16, 24)
        keep = st.clone()
        pa.linear_attention_step(r(3, 2, 16), r(3, 2, 16), r(3, 2, 24), state=st, g=r(3, 2, 16), state_indices=bad,
                                 backend="triton")
        pa.gated_delta_rule_step(r(3, 1, 16), r(3, 1, 16), r(3, 2, 24), r(3, 2), r(3, 2), state=st,
                                 state_indices=bad, backend="triton")
        ss = r(4, 2, 24, 16)
        keep_ss = ss.clone()
        pa.ssd_step(r(3, 2, 24), r(3, 2), r(2), r(3, 1, 16), r(3, 1, 16), state=ss, D=r(2), z=r(3, 2, 24),
                    state_indices=bad, backend="triton")
        cs = r(4, 8, 3)
        keep_cs = cs.clone()
        pa.causal_conv1d_step(r(3, 8), r(8, 4), state=cs, state_indices=bad, backend="triton")
        pa.causal_conv1d(r(9, 8), r(8, 4), initial_state=cs, state_indices=bad,
                         cu_seqlens=torch.tensor([0, 2, 4, 9], dtype=torch.int32), backend="triton")
        assert torch.equal(st, keep) and torch.equal(ss, keep_ss) and torch.equal(cs, keep_cs)
        pa.causal_conv1d(r(9, 8), r(8, 4), initial_state=cs, state_indices=torch.tensor([0, 1], dtype=torch.int32),
                         cu_seqlens=torch.tensor([0, 700, -50], dtype=torch.int32), backend="triton")
    """)


# ---- the compiled kernels -----------------------------------------------------------------------

@pytest.mark.parametrize("vendor", VENDORS)
def test_kernels_compile_for_gpu_targets(vendor):
    """Lower every step and conv kernel (each constexpr path) for a GPU target (tests/backends/triton/lowering.py)."""
    assert_lowers(vendor, """
        import triton
        from portable_attn.backends.triton import conv, steps

        def sig(fn, ptrs, floats=()):
            consts = {p.name for p in fn.params if p.is_constexpr}
            return {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32")
                    for n in fn.arg_names}

        def step_cases():
            base = dict(DECAY=0, DELTA=False, L2NORM=False, SSD=False, SOFTPLUS=False, HAS_DT_BIAS=False,
                        HAS_D=False, HAS_Z=False)
            for act, st, ce, bk, bv in [
                    ("bf16", "bf16", {}, 128, 64),                                           # linear
                    ("fp16", "fp32", dict(DECAY=2), 64, 64),                                 # GLA
                    ("fp16", "fp32", dict(DECAY=2, DELTA=True, L2NORM=True), 256, 32),       # KDA
                    ("fp32", "fp32", dict(DECAY=1, DELTA=True), 128, 64),                    # gated delta
                    ("bf16", "fp32", dict(DECAY=1, SSD=True, SOFTPLUS=True, HAS_DT_BIAS=True, HAS_D=True,
                                          HAS_Z=True), 128, 64),                             # ssd, all extras
                    ("fp32", "bf16", dict(DECAY=1, SSD=True), 1, 1)]:                        # ssd, tiny dims
                ptrs = {n: "*" + act for n in ("q_ptr", "k_ptr", "v_ptr", "z_ptr", "o_ptr")}
                ptrs.update({n: "*fp32" for n in ("g_ptr", "beta_ptr", "a_ptr", "dtb_ptr", "d_ptr")})
                ptrs.update(idx_ptr="*i32", s_ptr="*" + st)
                fn = steps._step_kernel
                s, c = sig(fn, ptrs, ("scale", "dt_lo", "dt_hi")), dict(base, **ce, BLOCK_K=bk, BLOCK_V=bv)
                absent(s, c, [n for n, on in (("g_ptr", c["DECAY"]), ("beta_ptr", c["DELTA"]), ("a_ptr", c["SSD"]),
                                              ("dtb_ptr", c["HAS_DT_BIAS"]), ("d_ptr", c["HAS_D"]),
                                              ("z_ptr", c["HAS_Z"])) if not on])
                yield fn, s, c

        def conv_cases():
            for act, ce in [("bf16", dict(VARLEN=True, STATE=2, HAS_FLAGS=True)),
                            ("fp32", dict(VARLEN=False, STATE=1, HAS_FLAGS=False)),
                            ("fp16", dict(VARLEN=True, STATE=0, HAS_FLAGS=False))]:
                ptrs = {n: "*" + act for n in ("x_ptr", "s_ptr", "y_ptr", "f_ptr", "bias_ptr")}
                ptrs.update(w_ptr="*fp32", cu_ptr="*i32", idx_ptr="*i32", has_ptr="*i1")
                gone = [n for n, on in (("cu_ptr", ce["VARLEN"]), ("s_ptr", ce["STATE"]), ("idx_ptr", ce["STATE"] == 2),
                                        ("has_ptr", ce["HAS_FLAGS"]), ("bias_ptr", act != "fp32")) if not on]
                fn = conv._conv_kernel
                s, c = sig(fn, ptrs), dict(ce, HAS_BIAS=act != "fp32", SILU=act == "bf16", BLOCK_T=64, BLOCK_C=128)
                absent(s, c, gone)
                yield fn, s, c
                fn = conv._final_kernel
                s, c = sig(fn, ptrs), dict(ce, IN_PLACE=ce["STATE"] == 2, BLOCK_C=128, BLOCK_W=4)
                absent(s, c, [n for n in gone if n in s])
                yield fn, s, c
            for act, st, bias, silu, w, dense, bc in (("bf16", "bf16", True, True, 4, True, 512),
                                                      ("fp16", "fp32", True, False, 3, False, 1024),
                                                      ("fp32", "fp32", False, False, 1, True, 1024),
                                                      ("bf16", "fp32", False, True, 256, True, 16)):
                ptrs = {n: "*" + act for n in ("x_ptr", "y_ptr", "bias_ptr", "w_ptr")}
                ptrs.update(idx_ptr="*i32", s_ptr="*" + st)
                fn = conv._step_kernel
                s, c = sig(fn, ptrs), dict(W=w, DENSE=dense, HAS_BIAS=bias, SILU=silu, BLOCK_C=bc,
                                           BLOCK_W=triton.next_power_of_2(w))
                absent(s, c, [] if bias else ["bias_ptr"])
                yield fn, s, c

        runs = [*step_cases(), *conv_cases()]
    """, {"num_warps": 4, "num_stages": 1})
