"""Each convention where ONNX Runtime's operators differ from docs/spec.md (backends/onnxruntime/conventions.py),
with inputs on which the other convention gives a different answer: the backend against the float64 reference."""
import math

import pytest
import torch

pytest.importorskip("onnxruntime")

import portable_attn as pa  # noqa: E402
from portable_attn.backends.onnxruntime import conventions  # noqa: E402
from tests.backends.compare import against_reference, assert_close  # noqa: E402

ORT = "onnxruntime"


def _qkv(g, lq, lk, hq=4, hkv=2, d=16):
    return (torch.randn(lq, hq, d, generator=g), torch.randn(lk, hkv, d, generator=g),
            torch.randn(lk, hkv, d, generator=g))


def test_causal_is_bottom_right():
    """3 queries over 9 keys: top-left alignment (ONNX Attention's is_causal without a past) would let query 0
    see key 0 only."""
    q, k, v = _qkv(torch.Generator().manual_seed(0), 3, 9)
    assert_close(*against_reference(ORT, "attention", q, k, v, causal=True))


def test_window_left_is_keys_before_the_query():
    """window (3, 0) sees p-3..p; GroupQueryAttention's local_window_size would be 4 for it (left + 1)."""
    q, k, v = _qkv(torch.Generator().manual_seed(1), 20, 20)
    mine, ref = against_reference(ORT, "attention", q, k, v, causal=True, window_size=(3, 0))
    assert_close(mine, ref)
    wider = pa.attention(q, k, v, causal=True, window_size=(4, 0), backend="reference")
    assert float((mine[0] - wider).abs().max()) > 1e-3  # the off-by-one would show


def test_sinks_join_the_denominator_only():
    q, k, v = _qkv(torch.Generator().manual_seed(2), 12, 12)
    sinks = torch.tensor([0.5, -1.0, 2.0, -math.inf])
    mine, ref = against_reference(ORT, "attention", q, k, v, causal=True, sinks=sinks, softcap=3.0)
    assert_close(mine, ref)
    plain = pa.attention(q, k, v, causal=True, softcap=3.0, backend="reference")
    assert float((mine[0][:, :3] - plain[:, :3]).abs().max()) > 1e-3  # a sink changes heads 0-2...
    assert torch.allclose(mine[0][:, 3], plain[:, 3].float(), atol=1e-5)  # ...and -inf is no sink


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_attention_scale(scale):
    """Attention refuses scale 0 (its attribute); ours 0 is a valid scale: uniform weights."""
    q, k, v = _qkv(torch.Generator().manual_seed(3), 5, 7)
    assert_close(*against_reference(ORT, "attention", q, k, v, softmax_scale=scale))


def test_gqa_maps_query_head_to_kv_head_by_division():
    """query head h reads kv head h // 2 here; the other common mapping (h % 2) gives other values."""
    q, k, v = _qkv(torch.Generator().manual_seed(4), 6, 6, hq=4, hkv=2)
    assert_close(*against_reference(ORT, "attention", q, k, v, causal=True))


def _delta_inputs(g, t=9, h=2, hv=4, kd=8):
    q, k = torch.randn(t, h, kd, generator=g), torch.randn(t, h, kd, generator=g)
    v = torch.randn(t, hv, kd, generator=g)  # square states: a transposed state would not fail on shape
    gate = -torch.rand(t, hv, generator=g)
    beta = torch.rand(t, hv, generator=g)
    return q, k, v, gate, beta, torch.randn(1, hv, kd, kd, generator=g)


@pytest.mark.parametrize("scale", [None, 0.0])
def test_delta_rule_state_is_k_major_and_scale_zero_is_zero(scale):
    """GatedDeltaNet keeps V-major states and reads scale 0 as 1/sqrt(K); ours are K-major and 0 is 0."""
    q, k, v, gate, beta, s0 = _delta_inputs(torch.Generator().manual_seed(5))
    kw = dict(scale=scale, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    out, final = pa.gated_delta_rule(q, k, v, gate, beta, **kw, backend=ORT)
    ref_out, ref_final = pa.gated_delta_rule(q.double(), k.double(), v.double(), gate, beta,
                                             **(kw | {"initial_state": s0.double()}), backend="reference")
    assert torch.allclose(final.double(), ref_final, atol=1e-5)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert (out == 0).all() == (scale == 0.0)


def test_linear_attention_state_is_k_major():
    q, k, v, gate, _, s0 = _delta_inputs(torch.Generator().manual_seed(6), hv=2)
    kw = dict(g=gate, initial_state=s0[:, :2], output_final_state=True)
    out, final = pa.linear_attention(q, k, v, **kw, backend=ORT)
    ref_out, ref_final = pa.linear_attention(q.double(), k.double(), v.double(),
                                             **(kw | {"initial_state": s0[:, :2].double()}), backend="reference")
    assert torch.allclose(final.double(), ref_final, atol=1e-5) and torch.allclose(out.double(), ref_out, atol=1e-4)


def test_ssd_state_is_p_by_n_and_groups_divide_heads():
    """SSD's [S, H, P, N] is GatedDeltaNet's V-major layout with V = P, K = N (P != N here); heads 0, 1 read
    B/C group 0 and heads 2, 3 group 1."""
    g = torch.Generator().manual_seed(7)
    t, h, grp, p, n = 7, 4, 2, 6, 10
    x, dt = torch.randn(t, h, p, generator=g), torch.rand(t, h, generator=g)
    a, b, c = -torch.rand(h, generator=g), torch.randn(t, grp, n, generator=g), torch.randn(t, grp, n, generator=g)
    kw = dict(D=torch.randn(h, generator=g), z=torch.randn(t, h, p, generator=g), dt_softplus=True,
              initial_state=torch.randn(1, h, p, n, generator=g), output_final_state=True)
    out, final = pa.ssd(x, dt, a, b, c, **kw, backend=ORT)
    up = {n_: (x_.double() if n_ in ("z", "initial_state") else x_) for n_, x_ in kw.items()}
    ref_out, ref_final = pa.ssd(x.double(), dt, a, b.double(), c.double(), **up, backend="reference")
    assert torch.allclose(final.double(), ref_final, atol=1e-5) and torch.allclose(out.double(), ref_out, atol=1e-4)


def test_gdn_scale_mapping():
    assert conventions.gdn_scale(0.25) == (0.25, None)
    assert conventions.gdn_scale(0.0) == (1.0, 0.0)
