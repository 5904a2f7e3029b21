"""Export a torch.nn.Module that calls portable_attn ops to ONNX, for ONNX Runtime.

    from portable_attn.integrations import onnx as pa_onnx
    program = pa_onnx.export(model, (x, state))   # a torch.onnx.ONNXProgram (the dynamo exporter)
    program.save("hybrid.onnx")

While the model is traced, the public ops record functional custom ops (namespace `portable_attn_onnx`: no
`out=`, states returned rather than written in place), and their translations emit the onnxruntime backend's
own graph bodies (backends/onnxruntime/graphs.py): ONNX `Attention` (opset 24), com.microsoft `GatedDeltaNet`
and `VarlenCausalConvWithState`. ONNX has no in-place inputs: a step form's state cache comes out of the model
only if `forward` returns it.

What exports (float32): `attention` over one sequence (causal, window, softcap, sinks, scale; not cu_seqlens or a
block mask); `linear_attention`, `gated_delta_rule`, `ssd`, `causal_conv1d` (packed cu_seqlens allowed, no
empty sequence, no state_indices) and their step forms (no state_indices: the cache's first bsz rows). Anything
else raises NotSupported naming the argument. Needs `pip install 'portable-attn[onnx]'`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import onnx
import onnxscript
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_schemas
from onnxscript import ir
from onnxscript.values import Opset

from portable_attn import library
from portable_attn.backends.onnxruntime import graphs
from portable_attn.backends.onnxruntime.kernels import MICROSOFT, OPSET
from portable_attn.dispatch import make_call
from portable_attn.errors import NotSupported
from portable_attn.optable import OPS

op = onnxscript.opset23  # the newest onnxscript knows; the model imports opset 24 (Attention's kernel there)
NS = "portable_attn_onnx"


def _register_schema(name: str) -> None:
    """ONNX Runtime's schema of com.microsoft `name` in onnx's registry (onnxscript records ops by schema)."""
    if onnx.defs.has(name, MICROSOFT):
        return
    src = next(s for s in _ort_schemas.get_all_operator_schema() if s.name == name and s.domain == MICROSOFT)
    Opt, Attr = onnx.defs.OpSchema.FormalParameterOption, onnx.defs.OpSchema.AttrType

    def params(ps):
        return [onnx.defs.OpSchema.FormalParameter(p.name, p.typeStr, p.description,
                                                   param_option=getattr(Opt, p.option.name)) for p in ps]

    onnx.defs.register_schema(onnx.defs.OpSchema(
        name, MICROSOFT, src.since_version, src.doc, inputs=params(src.inputs), outputs=params(src.outputs),
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in src.type_constraints],
        attributes=[onnx.defs.OpSchema.Attribute(a.name, getattr(Attr, a.type.name), a.description, required=False)
                    for a in src.attributes.values()]))


for _name in ("GatedDeltaNet", "VarlenCausalConvWithState"):
    _register_schema(_name)
_MSFT = Opset(MICROSOFT, 1)


class _Traced:
    """The graph bodies' emitter inside torch.onnx's translation functions (onnxscript records each op)."""

    def op(self, kind: str, *ins, outs: int = 1, domain: str = "", **attrs):
        args = [None if isinstance(x, str) else x for x in ins]  # "" is an omitted input
        result = getattr(_MSFT if domain else op, kind)(*args, **attrs)  # every output its schema has
        if not isinstance(result, (tuple, list)):
            return result
        return tuple(result[:outs]) if outs > 1 else result[0]

    def const(self, value, dtype=np.float32):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def zeros(self, shape):
        return op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, np.float32)))


def _cu(g, x, cu, step: bool):
    """int32 sequence bounds: cu_seqlens as given; a step form's one token per sequence; else one sequence."""
    if cu is not None:
        return op.Cast(cu, to=onnx.TensorProto.INT32)
    n = op.Shape(x, start=0, end=1)
    if step:
        return op.Cast(op.Range(g.const(0, np.int64), op.Squeeze(op.Add(n, g.const([1], np.int64))),
                                g.const(1, np.int64)), to=onnx.TensorProto.INT32)
    return op.Cast(op.Concat(g.const([0], np.int64), n, axis=0), to=onnx.TensorProto.INT32)


# ---- functional ops (what the trace records) and their translations ---------------------------

@torch.library.custom_op(f"{NS}::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor], causal: bool,
               window_size: list[int], softcap: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from portable_attn import ops

    return ops.attention(q, k, v, causal=causal, window_size=tuple(window_size), softcap=softcap, sinks=sinks,
                         softmax_scale=scale, return_lse=True)


@_attention.register_fake
def _(q, k, v, sinks, causal, window_size, softcap, scale):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]))


def _attention_onnx(q, k, v, sinks, causal: bool, window_size, softcap: float, scale: float):
    g = _Traced()
    allow = graphs.one_sequence_visibility(g, q, k, causal, tuple(window_size))
    y, lse = graphs.attention_core(g, graphs.heads_first(g, q), graphs.heads_first(g, k), graphs.heads_first(g, v),
                                   op.Unsqueeze(allow, g.const([0, 1], np.int64)), g.const(scale), sinks, softcap,
                                   True)
    return graphs.tokens_first(g, y), op.Squeeze(lse, g.const([0], np.int64))


@torch.library.custom_op(f"{NS}::delta_rule", mutates_args=())
def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                beta: Optional[torch.Tensor], state: torch.Tensor, cu: Optional[torch.Tensor], step: bool, rule: str,
                scale: float, l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from portable_attn import ops

    new = state.clone()
    if rule == "gated_delta":
        fn, kw = ops.gated_delta_rule, {"g": g, "beta": beta, "use_qk_l2norm": l2norm}
    else:
        fn, kw = ops.linear_attention, {"g": g}
    if step:
        return getattr(ops, fn.__name__ + "_step")(q, k, v, state=new, scale=scale, **kw), new
    rows = torch.arange(new.shape[0], dtype=torch.int32)
    out, _ = fn(q, k, v, scale=scale, initial_state=new, state_indices=rows, cu_seqlens=cu, **kw)
    return out, new


@_delta_rule.register_fake
def _(q, k, v, g, beta, state, cu, step, rule, scale, l2norm):
    return v.new_empty(v.shape), state.new_empty(state.shape)


def _delta_rule_onnx(q, k, v, g, beta, state, cu, step: bool, rule: str, scale: float, l2norm: bool):
    t = _Traced()
    return graphs.delta_body(t, q, k, v, g if g is not None else "", beta if beta is not None else "",
                             _cu(t, q, cu, step), state, rule, scale, l2norm)


@torch.library.custom_op(f"{NS}::ssd", mutates_args=())
def _ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], softplus: bool,
         dt_limit: list[float], state: torch.Tensor, cu: Optional[torch.Tensor],
         step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from portable_attn import ops

    new = state.clone()
    kw = {"D": D, "z": z, "dt_bias": dt_bias, "dt_softplus": softplus, "dt_limit": tuple(dt_limit)}
    if step:
        return ops.ssd_step(x, dt, A, B, C, state=new, **kw), new
    rows = torch.arange(new.shape[0], dtype=torch.int32)
    return ops.ssd(x, dt, A, B, C, initial_state=new, state_indices=rows, cu_seqlens=cu, **kw)[0], new


@_ssd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, softplus, dt_limit, state, cu, step):
    return x.new_empty(x.shape), state.new_empty(state.shape)


def _ssd_onnx(x, dt, A, B, C, D, z, dt_bias, softplus: bool, dt_limit, state, cu, step: bool):
    t = _Traced()
    return graphs.ssd_body(t, x, dt, A, B, C, D, z, dt_bias, _cu(t, x, cu, step), state, softplus, tuple(dt_limit))


@torch.library.custom_op(f"{NS}::causal_conv1d", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
          state: torch.Tensor, cu: Optional[torch.Tensor], step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from portable_attn import ops

    new = state.clone()
    if step:
        return ops.causal_conv1d_step(x, weight, bias, state=new, activation=activation), new
    rows = torch.arange(new.shape[0], dtype=torch.int32)
    out, _ = ops.causal_conv1d(x, weight, bias, activation=activation, initial_state=new, state_indices=rows,
                               cu_seqlens=cu)
    return out, new


@_conv.register_fake
def _(x, weight, bias, activation, state, cu, step):
    return x.new_empty(x.shape), state.new_empty(state.shape)


def _conv_onnx(x, weight, bias, activation, state, cu, step: bool):
    t = _Traced()
    return graphs.conv_body(t, x, weight, bias if bias is not None else "", _cu(t, x, cu, step), state, activation)


TRANSLATIONS = {
    torch.ops.portable_attn_onnx.attention.default: _attention_onnx,
    torch.ops.portable_attn_onnx.delta_rule.default: _delta_rule_onnx,
    torch.ops.portable_attn_onnx.ssd.default: _ssd_onnx,
    torch.ops.portable_attn_onnx.causal_conv1d.default: _conv_onnx,
}


# ---- the public ops while tracing -------------------------------------------------------------

def _refuse(op_name: str, a: dict, *names: str) -> None:
    for name in names:
        if a.get(name) is not None:
            raise NotSupported("onnx export", op_name, f"{name} is not exported (see portable_attn.integrations.onnx)")
    dtypes = {x.dtype for x in a.values() if isinstance(x, torch.Tensor) and x.is_floating_point()}
    if dtypes - {torch.float32}:
        raise NotSupported("onnx export", op_name, f"float32 only, got {sorted(map(str, dtypes))}")


def _record(op_name: str, args: dict):
    """The public op's result, recorded as a functional op (library.FUNCTIONAL while `export` runs)."""
    decl = OPS[op_name]
    a = make_call(op_name, {n: v for n, v in args.items() if n != "backend"}).args
    if op_name == "attention":
        _refuse(op_name, a, "cu_seqlens_q", "cu_seqlens_k", "block_mask", "out")
        o, lse = torch.ops.portable_attn_onnx.attention(a["q"], a["k"], a["v"], a["sinks"], a["causal"],
                                                        list(a["window_size"]), a["softcap"], a["softmax_scale"])
        return (o, lse) if a["return_lse"] else o
    base = decl.sequence or op_name
    if base not in ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d"):
        raise NotSupported("onnx export", op_name, "not exported (see portable_attn.integrations.onnx)")
    if decl.is_step:
        cache = a["state"]
        bsz = a[decl.primary].shape[0]
        if args.get("state_indices") is not None:
            raise NotSupported("onnx export", op_name, "state_indices is not exported: the cache's first bsz rows")
        _refuse(op_name, {n: v for n, v in a.items() if n != "state_indices"}, "out")
        state, cu = cache[:bsz].float(), None
    else:
        _refuse(op_name, a, "state_indices", "out")
        nseq = 1 if a["cu_seqlens"] is None else a["cu_seqlens"].shape[0] - 1
        init = a["initial_state"]
        state = (init.float() if init is not None
                 else a[decl.primary].new_zeros((nseq,) + tuple(decl.state_tail(a)), dtype=torch.float32))
        cu = a["cu_seqlens"]
    step = decl.is_step
    if base == "causal_conv1d":
        out, new = torch.ops.portable_attn_onnx.causal_conv1d(a["x"], a["weight"], a["bias"], a["activation"], state,
                                                               cu, step)
    elif base == "ssd":
        D = a["D"].reshape(a["x"].shape[1], -1) if a["D"] is not None else None  # [H] -> [H, 1]
        out, new = torch.ops.portable_attn_onnx.ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D, a["z"], a["dt_bias"],
                                                     a["dt_softplus"], list(a["dt_limit"]), state, cu, step)
    else:
        beta = a.get("beta")
        rule = "gated_delta" if beta is not None else ("gated" if a["g"] is not None else "linear")
        out, new = torch.ops.portable_attn_onnx.delta_rule(a["q"], a["k"], a["v"], a["g"], beta, state, cu, step,
                                                            rule, a["scale"], bool(a.get("use_qk_l2norm", False)))
    if step:
        cache[:new.shape[0]].copy_(new)  # an input mutation: returned from forward, it is a model output
        return out
    if not a["output_final_state"]:
        return out, None
    init = a["initial_state"]
    return out, new.to(init.dtype if init is not None else (a["x"].dtype if base == "causal_conv1d" else torch.float32))


@contextlib.contextmanager
def recording():
    """The public ops record the functional ops above while traced (torch.export), instead of the mutating ones."""
    previous, library.FUNCTIONAL = library.FUNCTIONAL, _record
    try:
        yield
    finally:
        library.FUNCTIONAL = previous


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, **options) -> torch.onnx.ONNXProgram:
    """`torch.onnx.export(model, args, dynamo=True, ...)` with the portable_attn ops translated to ONNX Runtime's
    operators (opset 24 and com.microsoft); `options` go to torch.onnx.export (dynamic_shapes, input_names, ...)."""
    table = TRANSLATIONS | options.pop("custom_translation_table", {})
    with recording():
        return torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                 custom_translation_table=table, **options)
