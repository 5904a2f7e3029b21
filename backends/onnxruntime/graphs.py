"""The ONNX graphs, one builder per kind of call. A builder takes the call's signature (what changes the
graph: flags, attributes) and returns a ModelProto whose tensor dims are symbolic; activations are float32
(float16/bfloat16 are widened before the graph, exactly), indices int64 or int32, masks bool."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import conventions
from .kernels import MICROSOFT, OPSET

F32, I64, I32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


class Graph:
    """A graph under construction: `op(...)` adds a node and returns its output names."""

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

    def op(self, kind: str, *ins: str, outs: int | list = 1, domain: str = "", **attrs):
        names = outs if isinstance(outs, list) else [f"t{self._n}_{i}" for i in range(outs)]
        self._n += 1
        self.nodes.append(helper.make_node(kind, list(ins), names, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def axes(self, *axes: int) -> str:
        return self.const(list(axes), np.int64)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "portable_attn", self.inputs, self.outputs, self.consts)
        return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET),
                                                                      helper.make_opsetid(MICROSOFT, 1)])


def _sanitised(g: Graph, x: str, keep: str) -> str:
    """x with rows no query sees set to 0: they may hold NaN (a stale cache), and a masked score still
    multiplies its value row in the op's products."""
    return g.op("Where", g.op("Unsqueeze", keep, g.axes(-1)), x, g.const(0.0))


def _with_sink_key(g: Graph, x: str) -> str:
    """x [B, H, S, d] with `SINK_KEYS` rows of zeros appended along S."""
    shape = g.op("Shape", x)
    pad = g.op("Concat", g.op("Slice", shape, g.axes(0), g.axes(2)), g.const([conventions.SINK_KEYS], np.int64),
               g.op("Slice", shape, g.axes(3), g.axes(4)), axis=0)
    return g.op("Concat", x, g.op("ConstantOfShape", pad, value=helper.make_tensor("z", F32, [1], [0.0])), axis=2)


def _core(g: Graph, q4: str, k4: str, v4: str, allow4: str, sig: dict) -> tuple[str, str | None]:
    """q4 [B, Hq, Sq, D], k4 [B, Hkv, Sk, D], v4 [B, Hkv, Sk, Dv], allow4 bool [B, 1|Hq, Sq, Sk] ->
    y [B, Hq, Sq, Dv] and, with `lse`, lse [B, Hq, Sq] (from the op's own scores after softcap and mask)."""
    q4 = g.op("Mul", q4, g.input("scale", F32, []))  # Attention refuses scale 0 (conventions)
    bias = g.op("Where", allow4, g.const(0.0), g.const(-math.inf))
    if sig["sinks"]:
        k4, v4 = _with_sink_key(g, k4), _with_sink_key(g, v4)
        shape = g.op("Shape", q4)  # [B, Hq, Sq, D]
        full = g.op("Concat", g.op("Slice", shape, g.axes(0), g.axes(3)), g.op("Shape", allow4, start=3), axis=0)
        sink = g.op("Reshape", g.input("sinks", F32, ["Hq"]), g.const([1, -1, 1, 1], np.int64))
        col = g.op("Expand", sink, g.op("Concat", g.op("Slice", shape, g.axes(0), g.axes(3)),
                                        g.const([conventions.SINK_KEYS], np.int64), axis=0))
        bias = g.op("Concat", g.op("Expand", bias, full), col, axis=3)
    attrs = {"scale": 1.0, "softcap": sig["softcap"]}
    if not sig["lse"]:
        return g.op("Attention", q4, k4, v4, bias, **attrs), None
    y, _, _, scores = g.op("Attention", q4, k4, v4, bias, outs=4, qk_matmul_output_mode=2, **attrs)
    return y, g.op("ReduceLogSumExp", scores, g.axes(-1), keepdims=0)


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
    heads_first = (lambda x: g.op("Unsqueeze", g.op("Transpose", x, perm=[1, 0, 2]), g.axes(0)))
    allow4 = g.op("Unsqueeze", g.input("allow", BOOL, ["Hm", "Tq", "Tk"]), g.axes(0))
    y, lse = _core(g, heads_first(q), heads_first(_sanitised(g, k, keep)), heads_first(_sanitised(g, v, keep)),
                   allow4, sig)
    g.output("out", g.op("Transpose", g.op("Squeeze", y, g.axes(0)), perm=[1, 0, 2]), F32, ["Tq", "Hq", "Dv"])
    if lse:
        g.output("lse", g.op("Squeeze", lse, g.axes(0)), F32, ["Hq", "Tq"])
    return g.model()


def sparse_attention(sig: dict) -> onnx.ModelProto:
    """Each query its own batch row over its top-k keys, gathered in-graph: q [Tq, Hq, D]; k, v viewed as
    [Tk * Hkv, .]; pick int64 [Tq, Hkv, topk] (their rows); keep bool [Tq, Hkv, topk] (listed); allow bool
    [Tq, Hq, 1, topk]."""
    g = Graph()
    q = g.input("q", F32, ["Tq", "Hq", "D"])
    pick = g.input("pick", I64, ["Tq", "Hkv", "topk"])
    keep = g.input("keep", BOOL, ["Tq", "Hkv", "topk"])
    k4, v4 = (_sanitised(g, g.op("Gather", g.input(n, F32, ["Tk*Hkv", d]), pick, axis=0), keep)
              for n, d in (("k", "D"), ("v", "Dv")))
    y, lse = _core(g, g.op("Unsqueeze", q, g.axes(2)), k4, v4, g.input("allow", BOOL, ["Tq", "Hq", 1, "topk"]), sig)
    g.output("out", g.op("Squeeze", y, g.axes(2)), F32, ["Tq", "Hq", "Dv"])
    if lse:
        g.output("lse", g.op("Transpose", g.op("Squeeze", lse, g.axes(2)), perm=[1, 0]), F32, ["Hq", "Tq"])
    return g.model()


def write_kv_cache(sig: dict) -> onnx.ModelProto:
    """cache [NB * BS, Hkv, d] with rows `slots` [n, 1] replaced by `rows` [n, Hkv, d]."""
    g = Graph()
    new = g.op("ScatterND", g.input("cache", F32, ["slots_all", "Hkv", "d"]), g.input("slots", I64, ["n", 1]),
               g.input("rows", F32, ["n", "Hkv", "d"]))
    g.output("new", new, F32, ["slots_all", "Hkv", "d"])
    return g.model()


def delta_rule(sig: dict) -> onnx.ModelProto:
    """GatedDeltaNet over packed sequences: q, k [T, H, K]; v [T, Hv, V]; g [T, Hv(, K)] unless `linear`;
    beta [T, Hv] for the delta rule; cu int32 [S+1]; state [S, Hv, K, V] (ours, K-major) -> out, final."""
    g = Graph()
    rule = sig["rule"]
    q, k = g.input("q", F32, ["T", "H", "K"]), g.input("k", F32, ["T", "H", "K"])
    v = g.input("v", F32, ["T", "Hv", "V"])
    decay = "" if rule == "linear" else g.input("g", F32, ["T", "Hv", "K"] if sig["per_key"] else ["T", "Hv"])
    beta = g.input("beta", F32, ["T", "Hv"]) if "delta" in rule else ""
    s0 = g.op("Transpose", g.input("state", F32, ["S", "Hv", "K", "V"]), perm=list(conventions.STATE_PERM))
    attr, post = conventions.gdn_scale(sig["scale"])
    y, s1 = g.op("GatedDeltaNet", q, k, v, g.input("cu", I32, ["S1"]), decay, beta, s0, outs=2, domain=MICROSOFT,
                 update_rule=rule, scale=attr, qk_l2_norm=int(sig["l2norm"]))
    if post is not None:
        y = g.op("Mul", y, g.const(post))
    g.output("out", y, F32, ["T", "Hv", "V"])
    g.output("final", g.op("Transpose", s1, perm=list(conventions.STATE_PERM)), F32, ["S", "Hv", "K", "V"])
    return g.model()


def ssd(sig: dict) -> onnx.ModelProto:
    """SSD as a gated linear recurrence: k = B, v = d * x, q = C, log-decay d * A, scale 1 (value head h reads
    B/C group h // (H / G), as GatedDeltaNet's grouped value heads do), then y += D x and y *= silu(z).
    x [T, H, P]; dt [T, H]; A [H]; B, C [T, G, N]; cu int32 [S+1]; state [S, H, P, N]."""
    g = Graph()
    x = g.input("x", F32, ["T", "H", "P"])
    d = g.input("dt", F32, ["T", "H"])
    if sig["dt_bias"]:
        d = g.op("Add", d, g.input("dt_bias", F32, ["H"]))
    if sig["softplus"]:
        d = g.op("Softplus", d)
    lo, hi = sig["dt_limit"]
    d = g.op("Min", g.op("Max", d, g.const(lo)), g.const(hi))  # [T, H]
    decay = g.op("Mul", d, g.input("A", F32, ["H"]))
    v = g.op("Mul", x, g.op("Unsqueeze", d, g.axes(-1)))
    y, s1 = g.op("GatedDeltaNet", g.input("C", F32, ["T", "G", "N"]), g.input("B", F32, ["T", "G", "N"]), v,
                 g.input("cu", I32, ["S1"]), decay, "", g.input("state", F32, ["S", "H", "P", "N"]), outs=2,
                 domain=MICROSOFT, update_rule="gated", scale=1.0, qk_l2_norm=0)
    if sig["D"]:
        skip = g.input("D", F32, ["H", "P"])  # D [H] arrives as [H, 1]
        y = g.op("Add", y, g.op("Mul", x, skip))
    if sig["z"]:
        z = g.input("z", F32, ["T", "H", "P"])
        y = g.op("Mul", y, g.op("Mul", z, g.op("Sigmoid", z)))
    g.output("out", y, F32, ["T", "H", "P"])
    g.output("final", s1, F32, ["S", "H", "P", "N"])
    return g.model()


def causal_conv1d(sig: dict) -> onnx.ModelProto:
    """VarlenCausalConvWithState: x [T, C]; weight [C, W]; bias [C]; cu int32 [S+1]; state [S, C, W-1]."""
    g = Graph()
    w = g.op("Unsqueeze", g.input("weight", F32, ["C", "W"]), g.axes(1))
    bias = g.input("bias", F32, ["C"]) if sig["bias"] else ""
    y, s1 = g.op("VarlenCausalConvWithState", g.input("x", F32, ["T", "C"]), w, g.input("cu", I32, ["S1"]), bias,
                 g.input("state", F32, ["S", "C", "Wm1"]), outs=2, domain=MICROSOFT,
                 activation=sig["activation"] or "none")
    g.output("out", y, F32, ["T", "C"])
    g.output("final", s1, F32, ["S", "C", "Wm1"])
    return g.model()
