"""The ONNX graphs. Each kind of call has a body, written once against an emitter (`g.op`, `g.const`, `g.zeros`)
that takes the call's values: `Graph` below records it as a ModelProto for the backend's sessions, and the ONNX
export (portable_attn/integrations/onnx.py) records the same body inside torch.onnx's translation functions.
The backend's builders take the call's signature (what changes the graph: flags, attributes); their tensor dims
are symbolic; activations are float32 (float16/bfloat16 are widened before the graph, exactly)."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import conventions
from .kernels import MICROSOFT, OPSET

F32, I64, I32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


class Graph:
    """The backend's emitter: a ModelProto under construction; values are names, "" an omitted input."""

    def __init__(self):
        self.nodes, self.inputs, self.outputs, self.consts, self._n = [], [], [], [], 0

    def input(self, name: str, elem: int, dims: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def output(self, name: str, value: str, elem: int, dims: list) -> None:
        self.op("Identity", value, outs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem, dims))

    def const(self, value, dtype=np.float32) -> str:
        name = f"c{len(self.consts)}"
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def zeros(self, shape: str) -> str:
        return self.op("ConstantOfShape", shape, value=helper.make_tensor("zero", F32, [1], [0.0]))

    def op(self, kind: str, *ins: str, outs: int | list = 1, domain: str = "", **attrs):
        names = outs if isinstance(outs, list) else [f"t{self._n}_{i}" for i in range(outs)]
        self._n += 1
        self.nodes.append(helper.make_node(kind, list(ins), names, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "portable_attn", self.inputs, self.outputs, self.consts)
        return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET),
                                                                      helper.make_opsetid(MICROSOFT, 1)])


def _axes(g, *axes: int):
    return g.const(list(axes), np.int64)


# ---- bodies (any emitter) ---------------------------------------------------------------------

def sanitised(g, x, keep):
    """x with rows no query sees set to 0: they may hold NaN (a stale cache), and a masked score still
    multiplies its value row in the op's products."""
    return g.op("Where", g.op("Unsqueeze", keep, _axes(g, -1)), x, g.const(0.0))


def _with_sink_key(g, x):
    """x [B, H, S, d] with `SINK_KEYS` rows of zeros appended along S."""
    shape = g.op("Shape", x)
    pad = g.op("Concat", g.op("Slice", shape, _axes(g, 0), _axes(g, 2)),
               g.const([conventions.SINK_KEYS], np.int64), g.op("Slice", shape, _axes(g, 3), _axes(g, 4)), axis=0)
    return g.op("Concat", x, g.zeros(pad), axis=2)


def attention_core(g, q4, k4, v4, allow4, scale, sinks, softcap: float, lse: bool):
    """q4 [B, Hq, Sq, D], k4 [B, Hkv, Sk, D], v4 [B, Hkv, Sk, Dv], allow4 bool [B|1, 1|Hq, Sq, Sk], scale a float32
    scalar, sinks [Hq] or None -> y [B, Hq, Sq, Dv] and, with `lse`, lse [B, Hq, Sq] (from the op's own scores
    after softcap and mask), else None."""
    q4 = g.op("Mul", q4, scale)  # Attention refuses scale 0 (conventions)
    bias = g.op("Where", allow4, g.const(0.0), g.const(-math.inf))
    if sinks is not None:
        k4, v4 = _with_sink_key(g, k4), _with_sink_key(g, v4)
        lead = g.op("Slice", g.op("Shape", q4), _axes(g, 0), _axes(g, 3))  # [B, Hq, Sq]
        full = g.op("Concat", lead, g.op("Shape", allow4, start=3), axis=0)
        col = g.op("Expand", g.op("Reshape", sinks, g.const([1, -1, 1, 1], np.int64)),
                   g.op("Concat", lead, g.const([conventions.SINK_KEYS], np.int64), axis=0))
        bias = g.op("Concat", g.op("Expand", bias, full), col, axis=3)
    attrs = {"scale": 1.0, "softcap": float(softcap)}
    if not lse:
        return g.op("Attention", q4, k4, v4, bias, **attrs), None
    y, _, _, scores = g.op("Attention", q4, k4, v4, bias, outs=4, qk_matmul_output_mode=2, **attrs)
    return y, g.op("ReduceLogSumExp", scores, _axes(g, -1), keepdims=0)


def one_sequence_visibility(g, q, k, causal: bool, window_size: tuple):
    """bool [Lq, Lk] of one sequence, from the positions in-graph: query t at p = t + Lk - Lq (bottom-right)."""
    lq, lk = (g.op("Squeeze", g.op("Shape", x, start=0, end=1), _axes(g, 0)) for x in (q, k))
    one = g.const(1, np.int64)
    p = g.op("Unsqueeze", g.op("Add", g.op("Range", g.const(0, np.int64), lq, one), g.op("Sub", lk, lq)),
             _axes(g, 1))                                                            # [Lq, 1]
    j = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), lk, one), _axes(g, 0))  # [1, Lk]
    allow = g.op("Equal", g.op("Sub", p, p), g.op("Sub", j, j))                      # all True, [Lq, Lk]
    left, right = window_size
    if causal:
        allow = g.op("And", allow, g.op("LessOrEqual", j, p))
    if left >= 0:
        allow = g.op("And", allow, g.op("GreaterOrEqual", j, g.op("Sub", p, g.const(left, np.int64))))
    if right >= 0:
        allow = g.op("And", allow, g.op("LessOrEqual", j, g.op("Add", p, g.const(right, np.int64))))
    return allow


def heads_first(g, x):
    """[T, H, d] -> [1, H, T, d]"""
    return g.op("Unsqueeze", g.op("Transpose", x, perm=[1, 0, 2]), _axes(g, 0))


def tokens_first(g, y):
    """[1, H, T, d] -> [T, H, d]"""
    return g.op("Transpose", g.op("Squeeze", y, _axes(g, 0)), perm=[1, 0, 2])


def l2normed(g, x):
    """x * rsqrt(sum of x^2 over the last axis + 1e-6), SPEC's `use_qk_l2norm` (GatedDeltaNet's own qk_l2_norm
    puts its epsilon elsewhere: 1e-3 off and more on keys of one or two dims with a small norm)."""
    total = g.op("ReduceSum", g.op("Mul", x, x), _axes(g, -1), keepdims=1)
    return g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", total, g.const(1e-6)))))


def delta_body(g, q, k, v, decay, beta, cu, state, rule: str, scale: float, l2norm: bool):
    """GatedDeltaNet over packed sequences: q, k [T, H, K]; v [T, Hv, V]; decay [T, Hv(, K)] or "" (linear);
    beta [T, Hv] or "" (no delta); cu int32 [S+1]; state [S, Hv, K, V] (ours, K-major) -> out, final."""
    attr, post = conventions.gdn_scale(scale)
    if l2norm:
        q, k = l2normed(g, q), l2normed(g, k)
    y, s1 = g.op("GatedDeltaNet", q, k, v, cu, decay, beta, g.op("Transpose", state, perm=list(conventions.STATE_PERM)),
                 outs=2, domain=MICROSOFT, update_rule=rule, scale=attr, qk_l2_norm=0)
    if post is not None:
        y = g.op("Mul", y, g.const(post))
    return y, g.op("Transpose", s1, perm=list(conventions.STATE_PERM))


def ssd_body(g, x, dt, A, B, C, D, z, dt_bias, cu, state, softplus: bool, dt_limit: tuple):
    """SSD as a gated linear recurrence: k = B, v = d * x, q = C, log-decay d * A, scale 1 (value head h reads
    B/C group h // (H / G), as GatedDeltaNet's grouped value heads do), then y += D x and y *= silu(z).
    x [T, H, P]; dt [T, H]; A [H]; B, C [T, G, N]; D [H, P|1] or None; z [T, H, P] or None; dt_bias [H] or None;
    cu int32 [S+1]; state [S, H, P, N] -> out, final."""
    d = dt if dt_bias is None else g.op("Add", dt, dt_bias)
    if softplus:
        d = g.op("Softplus", d)
    d = g.op("Min", g.op("Max", d, g.const(dt_limit[0])), g.const(dt_limit[1]))  # [T, H]
    v = g.op("Mul", x, g.op("Unsqueeze", d, _axes(g, -1)))
    y, s1 = g.op("GatedDeltaNet", C, B, v, cu, g.op("Mul", d, A), "", state, outs=2, domain=MICROSOFT,
                 update_rule="gated", scale=1.0, qk_l2_norm=0)
    if D is not None:
        y = g.op("Add", y, g.op("Mul", x, D))
    if z is not None:
        y = g.op("Mul", y, g.op("Mul", z, g.op("Sigmoid", z)))
    return y, s1


def conv_body(g, x, weight, bias, cu, state, activation: str | None):
    """VarlenCausalConvWithState: x [T, C]; weight [C, W]; bias [C] or ""; cu int32 [S+1]; state [S, C, W-1]."""
    return g.op("VarlenCausalConvWithState", x, g.op("Unsqueeze", weight, _axes(g, 1)), cu, bias, state, outs=2,
                domain=MICROSOFT, activation=activation or "none")


# ---- the backend's graphs (by signature) ------------------------------------------------------

def _attention_inputs(g: Graph, sig: dict) -> tuple:
    return g.input("scale", F32, []), (g.input("sinks", F32, ["Hq"]) if sig["sinks"] else None)


def attention(sig: dict) -> onnx.ModelProto:
    """Packed tokens as one batch row: q [Tq, Hq, D]; k, v [Tk, Hkv, .] (`paged`: gathered in-graph from the
    caches viewed as [NB * BS, Hkv, .] at `slots` [Tk]); allow bool [1|Hq, Tq, Tk]; keep bool [Tk, Hkv]."""
    g = Graph()
    q = g.input("q", F32, ["Tq", "Hq", "D"])
    if sig["paged"]:
        slots = g.input("slots", I64, ["Tk"])
        k, v = (g.op("Gather", g.input(n, F32, ["NB*BS", "Hkv", d]), slots, axis=0)
                for n, d in (("k_cache", "D"), ("v_cache", "Dv")))
    else:
        k, v = g.input("k", F32, ["Tk", "Hkv", "D"]), g.input("v", F32, ["Tk", "Hkv", "Dv"])
    keep = g.input("keep", BOOL, ["Tk", "Hkv"])
    allow4 = g.op("Unsqueeze", g.input("allow", BOOL, ["Hm", "Tq", "Tk"]), _axes(g, 0))
    y, lse = attention_core(g, heads_first(g, q), heads_first(g, sanitised(g, k, keep)),
                            heads_first(g, sanitised(g, v, keep)), allow4, *_attention_inputs(g, sig),
                            sig["softcap"], sig["lse"])
    g.output("out", tokens_first(g, y), F32, ["Tq", "Hq", "Dv"])
    if lse:
        g.output("lse", g.op("Squeeze", lse, _axes(g, 0)), F32, ["Hq", "Tq"])
    return g.model()


def sparse_attention(sig: dict) -> onnx.ModelProto:
    """Each query its own batch row over its top-k keys, gathered in-graph: q [Tq, Hq, D]; k, v viewed as
    [Tk * Hkv, .]; pick int64 [Tq, Hkv, topk] (their rows); keep bool [Tq, Hkv, topk] (listed); allow bool
    [Tq, Hq, 1, topk]."""
    g = Graph()
    q = g.input("q", F32, ["Tq", "Hq", "D"])
    pick = g.input("pick", I64, ["Tq", "Hkv", "topk"])
    keep = g.input("keep", BOOL, ["Tq", "Hkv", "topk"])
    k4, v4 = (sanitised(g, g.op("Gather", g.input(n, F32, ["Tk*Hkv", d]), pick, axis=0), keep)
              for n, d in (("k", "D"), ("v", "Dv")))
    y, lse = attention_core(g, g.op("Unsqueeze", q, _axes(g, 2)), k4, v4, g.input("allow", BOOL, ["Tq", "Hq", 1, "topk"]),
                            *_attention_inputs(g, sig), sig["softcap"], sig["lse"])
    g.output("out", g.op("Squeeze", y, _axes(g, 2)), F32, ["Tq", "Hq", "Dv"])
    if lse:
        g.output("lse", g.op("Transpose", g.op("Squeeze", lse, _axes(g, 2)), perm=[1, 0]), F32, ["Hq", "Tq"])
    return g.model()


def merge_attention_states(sig: dict) -> onnx.ModelProto:
    """o_a, o_b [T, H, Dv] weighted by exp(lse_part - lse) with lse = log(exp(lse_a) + exp(lse_b) (+ exp(sinks)))
    [H, T]; a part with lse -inf weighs 0 and its o is not read (Where, not a product: it may hold NaN)."""
    g = Graph()
    o_a, o_b = (g.input(n, F32, ["T", "H", "Dv"]) for n in ("o_a", "o_b"))
    lse_a, lse_b = (g.input(n, F32, ["H", "T"]) for n in ("lse_a", "lse_b"))
    parts = [lse_a, lse_b] + ([g.op("Unsqueeze", g.input("sinks", F32, ["H"]), _axes(g, 1))] if sig["sinks"] else [])

    def seen(x):  # lse > -inf
        return g.op("Not", g.op("IsInf", x, detect_positive=0))

    top = g.op("Max", *parts)
    top = g.op("Where", seen(top), top, g.const(0.0))  # all -inf: Z = 0, lse = log(0) = -inf
    lse = g.op("Add", g.op("Log", g.op("Sum", *(g.op("Exp", g.op("Sub", x, top)) for x in parts))), top)
    total = g.op("Where", seen(lse), lse, g.const(0.0))

    def weighted(o, part):
        w = g.op("Where", seen(part), g.op("Exp", g.op("Sub", part, total)), g.const(0.0))
        w = g.op("Unsqueeze", g.op("Transpose", w, perm=[1, 0]), _axes(g, 2))  # [T, H, 1]
        return g.op("Where", g.op("Greater", w, g.const(0.0)), g.op("Mul", w, o), g.const(0.0))

    g.output("out", g.op("Add", weighted(o_a, lse_a), weighted(o_b, lse_b)), F32, ["T", "H", "Dv"])
    g.output("lse", lse, F32, ["H", "T"])
    return g.model()


def write_kv_cache(sig: dict) -> onnx.ModelProto:
    """cache [NB * BS, Hkv, d] with rows `slots` [n, 1] replaced by `rows` [n, Hkv, d]."""
    g = Graph()
    new = g.op("ScatterND", g.input("cache", F32, ["slots_all", "Hkv", "d"]), g.input("slots", I64, ["n", 1]),
               g.input("rows", F32, ["n", "Hkv", "d"]))
    g.output("new", new, F32, ["slots_all", "Hkv", "d"])
    return g.model()


def _finish(g: Graph, y, final, y_dims: list, state_dims: list) -> onnx.ModelProto:
    g.output("out", y, F32, y_dims)
    g.output("final", final, F32, state_dims)
    return g.model()


def delta_rule(sig: dict) -> onnx.ModelProto:
    """delta_body with g [T, Hv(, K)] unless `linear` and beta [T, Hv] for the delta rule."""
    g = Graph()
    rule = sig["rule"]
    q, k = g.input("q", F32, ["T", "H", "K"]), g.input("k", F32, ["T", "H", "K"])
    v = g.input("v", F32, ["T", "Hv", "V"])
    decay = "" if rule == "linear" else g.input("g", F32, ["T", "Hv", "K"] if sig["per_key"] else ["T", "Hv"])
    beta = g.input("beta", F32, ["T", "Hv"]) if "delta" in rule else ""
    y, final = delta_body(g, q, k, v, decay, beta, g.input("cu", I32, ["S1"]),
                          g.input("state", F32, ["S", "Hv", "K", "V"]), rule, sig["scale"], sig["l2norm"])
    return _finish(g, y, final, ["T", "Hv", "V"], ["S", "Hv", "K", "V"])


def ssd(sig: dict) -> onnx.ModelProto:
    g = Graph()
    x = g.input("x", F32, ["T", "H", "P"])
    y, final = ssd_body(
        g, x, g.input("dt", F32, ["T", "H"]), g.input("A", F32, ["H"]), g.input("B", F32, ["T", "G", "N"]),
        g.input("C", F32, ["T", "G", "N"]), g.input("D", F32, ["H", "P1"]) if sig["D"] else None,
        g.input("z", F32, ["T", "H", "P"]) if sig["z"] else None,
        g.input("dt_bias", F32, ["H"]) if sig["dt_bias"] else None, g.input("cu", I32, ["S1"]),
        g.input("state", F32, ["S", "H", "P", "N"]), sig["softplus"], sig["dt_limit"])
    return _finish(g, y, final, ["T", "H", "P"], ["S", "H", "P", "N"])


def causal_conv1d(sig: dict) -> onnx.ModelProto:
    g = Graph()
    y, final = conv_body(g, g.input("x", F32, ["T", "C"]), g.input("weight", F32, ["C", "W"]),
                         g.input("bias", F32, ["C"]) if sig["bias"] else "", g.input("cu", I32, ["S1"]),
                         g.input("state", F32, ["S", "C", "Wm1"]), sig["activation"])
    return _finish(g, y, final, ["T", "C"], ["S", "C", "Wm1"])
