"""torch.library custom ops (namespace `portable_attn`) with fake kernels, one per public op, generated
from the op table, so that `torch.compile(fullgraph=True)` and CUDA graphs trace a model calling them.

Design: the custom ops are the *public entry points*, not per-backend kernels. Dispatch (argument
checks, backend selection, launching) is host Python that dynamo cannot and should not trace (the
registry's caches, entry points, imports), so it stays inside the op and runs at call time (at capture
time under CUDA graphs, where index checks are skipped); dynamo only sees
`torch.ops.portable_attn.<op>`, whose fake kernel gives the output shapes. The eager path keeps no
custom-op overhead.

Schema: the public op's arguments in order, then `str? backend`, then `Tensor(b!) out` (every op but
`write_kv_cache`: the compile path allocates `out` when the caller did not). A `BlockMask` travels as its
three tensors, block size and seq_len and is rebuilt inside without re-validation (it was validated when
built; validation would sync the device, which CUDA-graph capture forbids); `return_lse` is not an
argument: the attention ops always return `lse [Hq, Tq]` float32 (cheap). Sequence forms of the
recurrent ops declare their cache mutated and return the new final state (an empty tensor where the
public op returns the cache or None); step forms and `write_kv_cache` return nothing.

`compiled(op, args)` is the path `portable_attn.ops._dispatch` takes while `torch.compiler.is_compiling()`;
importing this module registers the ops and imports no kernel module.
"""
from __future__ import annotations

import torch

from portable_attn import dispatch
from portable_attn.masks import BlockMask
from portable_attn.optable import OPS, Op

_MASK = "Tensor? mask_layout, Tensor? mask_index, Tensor? mask_masks, int[] mask_block, int? mask_seq_len"
_MASK_NAMES = ("mask_layout", "mask_index", "mask_masks", "mask_block", "mask_seq_len")


def _eager(op: str, args: dict):
    """The public op's eager dispatch (checks, backend selection, kernels), never the compile path."""
    backend = args.pop("backend")
    return dispatch.run(op, args, backend)


def _mask(layout, index, masks, block, seq_len) -> BlockMask | None:
    if layout is None:
        return None
    bm = object.__new__(BlockMask)  # the frozen dataclass, its fields as given, no validation (see above)
    for name, value in (("block_size", (int(block[0]), int(block[1]))), ("layout", layout),
                        ("partial_index", index), ("partial_masks", masks), ("seq_len", seq_len)):
        object.__setattr__(bm, name, value)
    return bm


def _mask_args(bm: BlockMask | None) -> tuple:
    if bm is None:
        return None, None, None, (1, 1), None
    return bm.layout, bm.partial_index, bm.partial_masks, tuple(bm.block_size), bm.seq_len


def _schema_args(decl: Op) -> list:
    """(schema text, custom-op argument names) of `decl`'s public arguments, `out`/`return_lse` excluded."""
    parts, names = [], []
    for arg in decl.args:
        if arg.name in ("out", "return_lse"):
            continue
        if arg.type == "BlockMask?":
            parts.append(_MASK)
            names += _MASK_NAMES
            continue
        typ = arg.type
        if arg.name in decl.mutates:  # one alias set each (two caches may be views of one buffer)
            typ = f"Tensor({'ac'[decl.mutates.index(arg.name)]}!)" + ("?" if typ.endswith("?") else "")
        parts.append(f"{typ} {arg.name}")
        names.append(arg.name)
    return parts, names


def _returns(decl: Op) -> str:
    if decl.family == "cache" or decl.is_step:
        return "()"
    return "Tensor"


def _new_final(decl: Op, a: dict):
    """What a sequence form's custom op returns: its new final state, else an empty tensor."""
    if a["state_indices"] is not None or not a["output_final_state"]:
        return a["out"].new_empty(0)
    init = a["initial_state"]
    if init is not None:
        return init.new_empty(init.shape)
    nseq = 1 if a["cu_seqlens"] is None else a["cu_seqlens"].shape[0] - 1
    dtype = a["x"].dtype if decl.name == "causal_conv1d" else torch.float32
    return a["out"].new_empty((nseq,) + tuple(decl.state_tail(a)), dtype=dtype)


def _register(decl: Op) -> tuple:
    parts, names = _schema_args(decl)
    has_out = decl.family != "cache"
    names = names + ["backend"] + (["out"] if has_out else [])
    schema = f"({', '.join(parts)}, str? backend{', Tensor(b!) out' if has_out else ''}) -> {_returns(decl)}"
    mutated = decl.mutates + (("out",) if has_out else ())

    def public_args(args) -> dict:
        a = dict(zip(names, args))
        if "mask_layout" in a:
            a["block_mask"] = _mask(*(a.pop(n) for n in _MASK_NAMES))
        for name in ("window_size", "dt_limit"):
            if name in a:
                a[name] = tuple(a[name])
        return a

    def run(*args):
        a = public_args(args)
        if decl.family == "attention":
            return _eager(decl.name, dict(a, return_lse=True))[1]
        result = _eager(decl.name, a)
        if decl.family == "cache" or decl.is_step:
            return None
        if a["state_indices"] is None and a["output_final_state"]:
            return result[1].contiguous()
        return a["out"].new_empty(0)

    def fake(*args):
        a = dict(zip(names, args))
        if decl.family == "attention":  # lse [H, T] of the primary [T, H, ...]
            q = a[decl.primary]
            return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        if decl.family == "cache" or decl.is_step:
            return None
        return _new_final(decl, a)

    torch.library.custom_op(f"portable_attn::{decl.name}", run, mutates_args=mutated,
                            schema=schema).register_fake(fake)
    return tuple(names)


_NAMES = {op: _register(decl) for op, decl in OPS.items()}


def _out(decl: Op, a: dict):
    """The caller's `out`, or a new one of the op's output shape."""
    if a["out"] is not None:
        return a["out"]
    if decl.family == "attention":
        q = a[decl.primary]
        dv = a["v_cache"].shape[3] if "v_cache" in a else a["v"].shape[2] if "v" in a else q.shape[2]
        return q.new_empty((q.shape[0], q.shape[1], dv))
    like = a["v"] if "v" in a else a["x"]
    return like.new_empty(like.shape)


def _backend(spec) -> str | None:
    if spec is None or isinstance(spec, str):
        return spec
    return ",".join(spec)


FUNCTIONAL = None  # while portable_attn.integrations.onnx exports: (op, args) -> the public op's result


def compiled(op: str, args: dict):
    """The public op `op` with its arguments by name (`backend` included, defaults filled in), as one
    custom-op call that dynamo records; the public op's return value."""
    if FUNCTIONAL is not None:
        return FUNCTIONAL(op, args)
    decl = OPS[op]
    a = dict(args, backend=_backend(args.get("backend")))
    if decl.family != "cache":
        a["out"] = _out(decl, a)
    if "block_mask" in a:
        a.update(zip(_MASK_NAMES, _mask_args(a["block_mask"])))
    for name in ("window_size", "dt_limit"):
        if name in a:
            a[name] = [float(x) for x in a[name]] if name == "dt_limit" else list(a[name])
    result = getattr(torch.ops.portable_attn, op)(*(a[n] for n in _NAMES[op]))
    if decl.family == "cache":
        return None
    out = a["out"]
    if decl.family == "attention":
        return (out, result) if a["return_lse"] else out
    if decl.is_step:
        return out
    if a["state_indices"] is not None:
        return out, a["initial_state"] if a["output_final_state"] else None
    return out, result if a["output_final_state"] else None
