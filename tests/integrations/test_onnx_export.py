"""A small hybrid stack (windowed attention with sinks, a gated delta rule layer with its short convolution, an
SSD layer) exported to ONNX through portable_attn.integrations.onnx, run by ONNX Runtime's CPU provider and
compared with the same module run eagerly on the `cpu` backend: prefill, then the exported prefill's states fed
to the exported decode step (the step ops)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

import portable_attn as pa  # noqa: E402
from portable_attn.errors import NotSupported  # noqa: E402
from portable_attn.integrations import onnx as pa_onnx  # noqa: E402

D, H, HKV, HD = 32, 4, 2, 8         # model width, attention heads, kv heads, head dim
LH, LHV, LK, LV, W = 2, 4, 8, 8, 4  # delta rule: q/k heads, value heads, dims; conv width
SH, SG, SP, SN = 4, 2, 8, 8         # SSD: heads, groups, head dim, state size
WINDOW = (5, 0)
CONV = 2 * LH * LK + LHV * LV


def _lin(g, n_in, n_out):
    return torch.nn.Parameter(torch.randn(n_in, n_out, generator=g) * n_in ** -0.5)


class Hybrid(torch.nn.Module):
    """`forward(x, states)` runs every token of x [T, D] (prefill, T > 1) or one token of each sequence
    (decode: x [bsz, D], step ops); attention keys and values come in and go out as tensors."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = _lin(g, D, H * HD), _lin(g, D, HKV * HD), _lin(g, D, HKV * HD)
        self.wo, self.sinks = _lin(g, H * HD, D), torch.nn.Parameter(torch.randn(H, generator=g))
        self.w_mix, self.conv_w = _lin(g, D, CONV), torch.nn.Parameter(torch.randn(CONV, W, generator=g) * 0.5)
        self.conv_b, self.w_gb = torch.nn.Parameter(torch.randn(CONV, generator=g) * 0.1), _lin(g, D, 2 * LHV)
        self.w_delta_out = _lin(g, LHV * LV, D)
        self.w_x, self.w_bc, self.w_dt = _lin(g, D, SH * SP), _lin(g, D, 2 * SG * SN), _lin(g, D, SH)
        self.a_log, self.skip = torch.nn.Parameter(torch.randn(SH, generator=g) * 0.3), torch.nn.Parameter(torch.randn(SH, generator=g))
        self.w_z, self.w_ssd_out = _lin(g, D, SH * SP), _lin(g, SH * SP, D)

    def forward(self, x, k_past, v_past, conv_state, delta_state, ssd_state, step: bool = False):
        n = x.shape[0]
        # windowed attention with sinks; decode: one query over the past and its own key (bottom-right)
        q = (x @ self.wq).reshape(n, H, HD)
        k = torch.cat([k_past, (x @ self.wk).reshape(n, HKV, HD)])
        v = torch.cat([v_past, (x @ self.wv).reshape(n, HKV, HD)])
        x = x + pa.attention(q, k, v, causal=True, window_size=WINDOW, sinks=self.sinks).reshape(n, -1) @ self.wo
        # gated delta rule with its short convolution
        mixed = x @ self.w_mix
        if step:
            mixed = pa.causal_conv1d_step(mixed, self.conv_w, self.conv_b, state=conv_state, activation="silu")
        else:
            mixed, conv_state = pa.causal_conv1d(mixed, self.conv_w, self.conv_b, activation="silu",
                                                 initial_state=conv_state, output_final_state=True)
        dq, dk, dv = mixed.split([LH * LK, LH * LK, LHV * LV], dim=-1)
        gb = x @ self.w_gb
        gate, beta = -torch.nn.functional.softplus(gb[:, :LHV]), torch.sigmoid(gb[:, LHV:])
        dq, dk, dv = dq.reshape(n, LH, LK), dk.reshape(n, LH, LK), dv.reshape(n, LHV, LV)
        if step:
            o = pa.gated_delta_rule_step(dq, dk, dv, gate, beta, state=delta_state, use_qk_l2norm=True)
        else:
            o, delta_state = pa.gated_delta_rule(dq, dk, dv, gate, beta, initial_state=delta_state,
                                                 output_final_state=True, use_qk_l2norm=True)
        x = x + o.reshape(n, -1) @ self.w_delta_out
        # SSD (Mamba-2) with D skip and z gate
        xs, (b, c) = (x @ self.w_x).reshape(n, SH, SP), (x @ self.w_bc).reshape(n, 2, SG, SN).unbind(1)
        kw = dict(D=self.skip, z=(x @ self.w_z).reshape(n, SH, SP), dt_softplus=True)
        a = -torch.exp(self.a_log)
        if step:
            y = pa.ssd_step(xs, x @ self.w_dt, a, b, c, state=ssd_state, **kw)
        else:
            y, ssd_state = pa.ssd(xs, x @ self.w_dt, a, b, c, initial_state=ssd_state, output_final_state=True, **kw)
        return x + y.reshape(n, -1) @ self.w_ssd_out, k, v, conv_state, delta_state, ssd_state


class Decode(Hybrid):
    def forward(self, x, k_past, v_past, conv_state, delta_state, ssd_state):
        return super().forward(x, k_past, v_past, conv_state, delta_state, ssd_state, step=True)


def _ort(program, args):
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().numpy() for i, a in zip(sess.get_inputs(), args)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def _states(g, nseq=1):
    return (torch.randn(nseq, CONV, W - 1, generator=g), torch.randn(nseq, LHV, LK, LV, generator=g) * 0.1,
            torch.randn(nseq, SH, SP, SN, generator=g) * 0.1)


@torch.no_grad()
def test_hybrid_prefill_and_decode_export_run_in_onnxruntime():
    g = torch.Generator().manual_seed(1)
    t = 12
    x = torch.randn(t, D, generator=g)
    empty = torch.zeros(0, HKV, HD)
    prefill_args = (x, empty, empty, *_states(g))
    prefill, decode = Hybrid().eval(), Decode().eval()
    decode.load_state_dict(prefill.state_dict())
    eager = prefill(*[a.clone() for a in prefill_args])
    got = _ort(pa_onnx.export(prefill, prefill_args), prefill_args)
    assert len(got) == 6
    for mine, ref in zip(got, eager):
        assert torch.allclose(mine, ref, atol=2e-4, rtol=1e-4), float((mine - ref).abs().max())
    # decode one token from the exported prefill's keys, values and states; eager from its own
    x1 = torch.randn(1, D, generator=g)
    step_args = (x1, *got[1:])
    eager_step = decode(*[a.clone() for a in (x1, *eager[1:])])  # the step ops update the clones in place
    got_step = _ort(pa_onnx.export(decode, tuple(a.clone() for a in step_args)), step_args)
    for mine, ref in zip(got_step, eager_step):
        assert torch.allclose(mine, ref, atol=2e-4, rtol=1e-4), float((mine - ref).abs().max())
    # the exported decode step is the recurrence: prefill of t + 1 tokens == prefill of t, then the step
    whole = prefill(torch.cat([x, x1]), empty, empty, *[a.clone() for a in prefill_args[3:]])
    assert torch.allclose(got_step[0], whole[0][-1:], atol=2e-4)
    for mine, ref in zip(got_step[3:], whole[3:]):
        assert torch.allclose(mine, ref, atol=2e-4)


def test_the_exported_model_uses_onnxruntime_operators():
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(6, D, generator=g), torch.zeros(0, HKV, HD), torch.zeros(0, HKV, HD), *_states(g))
    kinds = {(n.domain, n.op_type) for n in pa_onnx.export(Hybrid().eval(), args).model_proto.graph.node}
    assert {("", "Attention"), ("com.microsoft", "GatedDeltaNet"),
            ("com.microsoft", "VarlenCausalConvWithState")} <= kinds


def test_what_does_not_export_says_so():
    class Varlen(torch.nn.Module):
        def forward(self, q, cu):
            return pa.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)

    q, cu = torch.randn(4, 2, 8), torch.tensor([0, 1, 4], dtype=torch.int32)
    with pytest.raises(Exception) as info:
        pa_onnx.export(Varlen(), (q, cu))
    assert "cu_seqlens_q is not exported" in str(info.value) or isinstance(info.value, NotSupported)
