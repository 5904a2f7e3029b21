"""SPEC "Autograd": the ops are inference ops. A tensor that requires grad, with grad mode on, is refused
with NotSupported naming the op and the backend, before anything runs; without grad the same call runs."""
import pytest
import torch

import portable_attn as pa
from portable_attn.backend import OPS, Call
from portable_attn.errors import NotSupported
from portable_attn.ops import make_call
from portable_attn.backends.reference import ReferenceBackend
from portable_attn.registry import backends

I32 = torch.int32
torch.manual_seed(0)


def inputs(op: str) -> dict:
    """Small random non-zero arguments of `op` by name; caches and states are fresh tensors."""
    t, h, d = 5, 2, 8
    if op in ("attention", "sparse_attention"):
        a = dict(q=torch.randn(t, 4, d), k=torch.randn(t, h, d), v=torch.randn(t, h, d), sinks=torch.randn(4))
        if op == "sparse_attention":
            a["indices"] = torch.tensor([[[0, 2, -1]] * h] * t, dtype=I32)
        return a
    if op == "merge_attention_states":
        return dict(o_a=torch.randn(t, h, d), lse_a=torch.randn(h, t), o_b=torch.randn(t, h, d), lse_b=torch.randn(h, t),
                    sinks=torch.randn(h))
    if op == "paged_attention":
        return dict(q=torch.randn(2, 4, d), k_cache=torch.randn(4, 3, h, d), v_cache=torch.randn(4, 3, h, d),
                    block_table=torch.tensor([[2, 0], [1, 3]], dtype=I32), seqused_k=torch.tensor([5, 2], dtype=I32))
    if op == "write_kv_cache":
        return dict(k=torch.randn(3, h, d), v=torch.randn(3, h, d), k_cache=torch.randn(4, 3, h, d),
                    v_cache=torch.randn(4, 3, h, d), slot_mapping=torch.tensor([7, -1, 2], dtype=I32))
    step = op.endswith("_step")
    n = 2 if step else t
    if op.startswith("causal_conv1d"):
        a = dict(x=torch.randn(n, d), weight=torch.randn(d, 4), bias=torch.randn(d))
        tail = (d, 3)
    elif op.startswith("ssd"):
        a = dict(x=torch.randn(n, h, d), dt=torch.rand(n, h), A=-torch.rand(h), B=torch.randn(n, 1, 4),
                 C=torch.randn(n, 1, 4), D=torch.randn(h))
        tail = (h, d, 4)
    else:
        a = dict(q=torch.randn(n, h, d), k=torch.randn(n, h, d), v=torch.randn(n, h, d), g=-torch.rand(n, h))
        if op.startswith("gated_delta_rule"):
            a["beta"] = torch.rand(n, h)
        tail = (h, d, d)
    a["state" if step else "initial_state"] = torch.randn((3,) + tail)  # a state cache, row 2 used
    a["state_indices"] = torch.tensor([2, 0] if step else [2], dtype=I32)
    return a


def first_input(a: dict) -> str:
    """The activation the test marks as requiring grad (q, k, x or o_a)."""
    return next(n for n in ("q", "k", "x", "o_a") if n in a)


def run(op: str, a: dict, backend: str):
    """`op` on `a`; its return value and the caches/states it updated, for comparison."""
    out = getattr(pa, op)(**a, backend=backend)
    return out, [a[n] for n in ("k_cache", "v_cache", "state", "initial_state") if n in a and op != "paged_attention"]


def same(x, y) -> bool:
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return x is None and y is None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op", OPS)
def test_requires_grad_is_refused_and_no_grad_runs(op, backend):
    torch.manual_seed(1)
    a = inputs(op)
    want = run(op, {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in a.items()}, backend)
    name = first_input(a)
    a[name].requires_grad_(True)
    kept = {n: x.clone() for n, x in a.items() if isinstance(x, torch.Tensor) and n != name}
    with pytest.raises(NotSupported, match=rf"backend '{backend}' does not support {op}: inference only, no "
                                           r"backward: .*torch\.no_grad\(\).*\.detach\(\)"):
        getattr(pa, op)(**a, backend=backend)
    assert all(torch.equal(a[n], x) for n, x in kept.items()), "a refused call changed a cache or state"
    with torch.no_grad():
        got = run(op, a, backend)
    assert same(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_any_tensor_argument_counts(backend):
    """A learned parameter (sinks, conv weight) or a state that requires grad is refused too."""
    a = inputs("attention")
    a["sinks"].requires_grad_(True)
    with pytest.raises(NotSupported, match="attention: inference only"):
        pa.attention(**a, backend=backend)
    c = inputs("causal_conv1d")
    c["weight"] = torch.nn.Parameter(c["weight"])
    with pytest.raises(NotSupported, match="causal_conv1d: inference only"):
        pa.causal_conv1d(**c, backend=backend)
    s = inputs("ssd")
    s["initial_state"].requires_grad_(True)
    with pytest.raises(NotSupported, match="ssd: inference only"):
        pa.ssd(**s, backend=backend)


def test_inference_mode_detach_and_grad_mode_off_run():
    a = inputs("gated_delta_rule")
    want = pa.gated_delta_rule(**dict(a, initial_state=a["initial_state"].clone()), backend="cpu")
    q = a["q"].requires_grad_(True)
    with torch.inference_mode():
        assert same(pa.gated_delta_rule(**dict(a, initial_state=a["initial_state"].clone()), backend="cpu"), want)
    with torch.set_grad_enabled(False):
        assert same(pa.gated_delta_rule(**dict(a, initial_state=a["initial_state"].clone()), backend="cpu"), want)
    detached = dict(a, q=q.detach(), initial_state=a["initial_state"].clone())
    assert same(pa.gated_delta_rule(**detached, backend="cpu"), want)


def test_the_default_priority_names_every_backend_it_tried():
    a = inputs("linear_attention")
    a["v"].requires_grad_(True)
    with pytest.raises(NotSupported, match=r"backend 'cpu/torch/reference' does not support linear_attention: cpu: "
                                           r"inference only.*; torch: linear_attention is not implemented; "
                                           r"reference: inference only"):
        pa.linear_attention(**a)


def test_no_backend_declares_a_backward_yet():
    """SPEC: no backend has a tested backward; one that gains it declares it in `Backend.backward`."""
    assert {name: b.backward for name, b in backends().items() if b.backward} == {}


def test_a_declared_backward_is_selected():
    """The declaration is what `supports` reads: a backend declaring attention's backward takes the call."""

    class WithBackward(ReferenceBackend):
        backward = frozenset({"attention"})

    a = inputs("attention")
    a["q"].requires_grad_(True)
    call = make_call("attention", a)
    assert isinstance(call, Call) and call.needs_grad
    assert WithBackward().supports(call) is None
    assert "inference only" in ReferenceBackend().supports(call)
    with torch.no_grad():
        assert not make_call("attention", a).needs_grad
