"""The public attention ops trace under torch.compile(fullgraph=True) as portable_attn custom ops."""
import pytest
import torch

import portable_attn as pa


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, h, 16, generator=g) for h in (4, 2, 2))
    kc, vc = torch.randn(4, 3, 2, 16, generator=g), torch.randn(4, 3, 2, 16, generator=g)
    slots = torch.tensor([5, 0, -1, 7], dtype=torch.int32)
    table, used = torch.tensor([[2, 0, 1]], dtype=torch.int32), torch.tensor([8], dtype=torch.int32)

    def step(q, k, v, kc, vc):
        o, lse = pa.attention(q, k, v, causal=True, window_size=(5, 0), return_lse=True, backend=backend)
        pa.write_kv_cache(k[:4], v[:4], kc, vc, slots, backend=backend)
        d = pa.paged_attention(q[:1], kc, vc, table, used, backend=backend)
        return o, lse, d

    eager_caches = kc.clone(), vc.clone()
    want = step(q, k, v, *eager_caches)
    got = torch.compile(step, fullgraph=True, backend="eager")(q, k, v, kc, vc)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kc, eager_caches[0])
    torch.testing.assert_close(vc, eager_caches[1])


def _recurrent_inputs(g):
    """One decode-and-prefill step of a hybrid model: every recurrent op, caches with permuted rows."""
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    return dict(
        q=r(12, 2, 8), k=r(12, 2, 8, scale=0.3), v=r(12, 4, 8), g=-r(12, 4).abs(), gk=-r(12, 2, 8).abs(),
        beta=torch.rand(12, 4, generator=g), x=r(12, 4, 6), dt=r(12, 4), A=-r(4).exp(), B=r(12, 2, 8),
        C=r(12, 2, 8), D=r(4), z=r(12, 4, 6), dt_bias=r(4), xc=r(12, 16), w=r(16, 4, scale=0.5), bias=r(16),
        cu=cu, rows=torch.tensor([4, -1, 1], dtype=torch.int32), has=torch.tensor([True, True, False]),
        step_rows=torch.tensor([3, 0], dtype=torch.int32),
        la_cache=r(6, 2, 8, 8), gdr_cache=r(6, 4, 8, 8), ssd_cache=r(6, 4, 6, 8), conv_cache=r(6, 16, 3),
        la_init=r(3, 2, 8, 8, scale=0.5))


def _recurrent_step(backend):
    def step(t):
        la, la_final = pa.linear_attention(t["q"], t["k"], t["q"], g=t["gk"], initial_state=t["la_init"],
                                           output_final_state=True, cu_seqlens=t["cu"], backend=backend)
        la_plain, none = pa.linear_attention(t["q"], t["k"], t["q"], backend=backend)
        new_final = pa.linear_attention(t["q"][:5], t["k"][:5], t["q"][:5], output_final_state=True,
                                        backend=backend)[1]
        gdr, cache = pa.gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["gdr_cache"],
                                         state_indices=t["rows"], has_initial_state=t["has"], cu_seqlens=t["cu"],
                                         output_final_state=True, use_qk_l2norm=True, backend=backend)
        y, _ = pa.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                      dt_softplus=True, dt_limit=(0.0, 2.0), initial_state=t["ssd_cache"], state_indices=t["rows"],
                      cu_seqlens=t["cu"], backend=backend)
        c, conv_final = pa.causal_conv1d(t["xc"], t["w"], t["bias"], activation="silu", cu_seqlens=t["cu"],
                                         output_final_state=True, backend=backend)
        out = torch.empty(2, 2, 8)
        s1 = pa.linear_attention_step(t["q"][:2], t["k"][:2], t["q"][:2], state=t["la_cache"], g=t["g"][:2, :2],
                                      state_indices=t["step_rows"], out=out, backend=backend)
        s2 = pa.gated_delta_rule_step(t["q"][:2], t["k"][:2], t["v"][:2], t["g"][:2], t["beta"][:2],
                                      state=t["gdr_cache"], backend=backend)
        s3 = pa.ssd_step(t["x"][:2], t["dt"][:2], t["A"], t["B"][:2], t["C"][:2], state=t["ssd_cache"], D=t["D"],
                         state_indices=t["step_rows"], backend=backend)
        s4 = pa.causal_conv1d_step(t["xc"][:2], t["w"], state=t["conv_cache"], state_indices=t["step_rows"],
                                   backend=backend)
        assert none is None and cache is t["gdr_cache"] and s1 is out
        return la, la_final, la_plain, new_final, gdr, y, c, conv_final, s1, s2, s3, s4
    return step


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_recurrent_fullgraph_matches_eager(backend):
    """Every recurrent op traces with fullgraph=True and matches eager, caches updated in place."""
    torch._dynamo.reset()
    inputs = _recurrent_inputs(torch.Generator().manual_seed(1))
    eager = {n: x.clone() for n, x in inputs.items()}
    want = _recurrent_step(backend)(eager)
    got = torch.compile(_recurrent_step(backend), fullgraph=True, backend="eager")(inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for name in ("la_cache", "gdr_cache", "ssd_cache", "conv_cache"):
        torch.testing.assert_close(inputs[name], eager[name])
        assert not torch.equal(inputs[name], _recurrent_inputs(torch.Generator().manual_seed(1))[name])


def test_recurrent_opcheck():
    """Schemas, fake kernels and declared mutations agree with what the recurrent ops do."""
    t = _recurrent_inputs(torch.Generator().manual_seed(2))
    ops = torch.ops.portable_attn
    nan = lambda *s: torch.full(s, float("nan"))  # noqa: E731
    cases = [
        (ops.linear_attention, (t["q"], t["k"], t["q"], t["gk"], None, t["la_init"], True, None, None, t["cu"],
                                "cpu", nan(12, 2, 8))),
        (ops.linear_attention, (t["q"], t["k"], t["q"], None, 0.5, None, True, None, None, None, "cpu",
                                nan(12, 2, 8))),
        (ops.gated_delta_rule, (t["q"], t["k"], t["v"], t["g"], t["beta"], None, t["gdr_cache"], True, t["rows"],
                                t["has"], t["cu"], True, "cpu", nan(12, 4, 8))),
        (ops.ssd, (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, [0.0, 2.0],
                   t["ssd_cache"], False, t["rows"], None, t["cu"], "cpu", nan(12, 4, 6))),
        (ops.causal_conv1d, (t["xc"], t["w"], t["bias"], "silu", None, True, None, None, t["cu"], "cpu",
                             nan(12, 16))),
        (ops.linear_attention_step, (t["q"][:2], t["k"][:2], t["q"][:2], t["la_cache"], None, None,
                                     t["step_rows"], "cpu", nan(2, 2, 8))),
        (ops.gated_delta_rule_step, (t["q"][:2], t["k"][:2], t["v"][:2], t["g"][:2], t["beta"][:2], t["gdr_cache"],
                                     None, None, False, "cpu", nan(2, 4, 8))),
        (ops.ssd_step, (t["x"][:2], t["dt"][:2], t["A"], t["B"][:2], t["C"][:2], t["ssd_cache"], None, t["z"][:2],
                        None, False, [0.0, float("inf")], t["step_rows"], "cpu", nan(2, 4, 6))),
        (ops.causal_conv1d_step, (t["xc"][:2], t["w"], None, t["conv_cache"], None, t["step_rows"], "cpu",
                                  nan(2, 16))),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)
