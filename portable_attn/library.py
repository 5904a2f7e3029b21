"""torch.library custom ops (namespace `portable_attn`) with fake kernels for the attention family,
so that `torch.compile(fullgraph=True)` and CUDA graphs trace a model calling the public ops.

Design: the custom ops are the *public entry points*, not per-backend kernels. Dispatch (argument
checks, backend selection, launching) is host Python that dynamo cannot and should not trace
(`inspect`, the registry's caches, entry points, imports), so it stays inside the op and runs at call
time (at capture time under CUDA graphs, where index checks are skipped); dynamo only sees
`torch.ops.portable_attn.<op>`, whose fake kernel gives the output shapes. This works for every torch
backend (triton, cpu, reference), and the eager path keeps no custom-op overhead.

- `attention`, `paged_attention`, `sparse_attention`: `out` is always given (the compile path allocates
  it when the caller did not) and declared mutated; the op returns `lse [Hq, Tq]` float32 (always
  computed, cheap), and the compile path returns `out` or `(out, lse)` as the public op does.
- `write_kv_cache` declares `k_cache` and `v_cache` mutated (they may be views of one buffer).
- Custom ops take only tensors and primitives: a `BlockMask` travels as its three tensors, block size
  and seq_len, and is rebuilt inside without re-validation (it was validated when it was built, and
  validation would sync the device, which CUDA-graph capture forbids); `backend=` as a string (a
  priority list joined by commas).

- Recurrent ops (schemas in `RECURRENT`, the public op's arguments in order): `out` as for attention.
  Sequence forms declare `initial_state` mutated (with `state_indices` it is the state cache, written in
  place) and return the new final state, an empty tensor where the public op returns the cache or None;
  step forms declare `state` mutated and return nothing.

`compiled(op, args)` is the path `portable_attn.ops._dispatch` takes while `torch.compiler.is_compiling()`;
importing this module registers the ops and imports no kernel module.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from portable_attn.masks import BlockMask

Tensor = torch.Tensor
ATTENTION = ("attention", "paged_attention", "sparse_attention")


def _eager(op: str, args: dict):
    """The public op's eager dispatch (checks, backend selection, kernels), never the compile path."""
    from portable_attn import ops, registry
    backend = args.pop("backend")
    call = ops.make_call(op, args)
    return registry.select(call, backend).run(call)


def _mask(layout, index, masks, block, seq_len) -> BlockMask | None:
    if layout is None:
        return None
    bm = object.__new__(BlockMask)  # the frozen dataclass, its fields as given, no validation (see above)
    for name, value in (("block_size", (int(block[0]), int(block[1]))), ("layout", layout),
                        ("partial_index", index), ("partial_masks", masks), ("seq_len", seq_len)):
        object.__setattr__(bm, name, value)
    return bm


def _mask_args(bm: BlockMask | None) -> dict:
    if bm is None:
        return {"mask_layout": None, "mask_index": None, "mask_masks": None, "mask_block": (1, 1),
                "mask_seq_len": None}
    return {"mask_layout": bm.layout, "mask_index": bm.partial_index, "mask_masks": bm.partial_masks,
            "mask_block": tuple(bm.block_size), "mask_seq_len": bm.seq_len}


def _lse(q: Tensor) -> Tensor:
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("portable_attn::attention", mutates_args=("out",))
def _attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
               max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool, window_size: Sequence[int],
               softcap: float, sinks: Optional[Tensor], softmax_scale: Optional[float],
               mask_layout: Optional[Tensor], mask_index: Optional[Tensor], mask_masks: Optional[Tensor],
               mask_block: Sequence[int], mask_seq_len: Optional[int], backend: Optional[str], out: Tensor) -> Tensor:
    _, lse = _eager("attention", dict(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, causal=causal, window_size=tuple(window_size), softcap=softcap, sinks=sinks,
        softmax_scale=softmax_scale, block_mask=_mask(mask_layout, mask_index, mask_masks, mask_block, mask_seq_len),
        return_lse=True, out=out, backend=backend))
    return lse


@_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size, softcap, sinks,
      softmax_scale, mask_layout, mask_index, mask_masks, mask_block, mask_seq_len, backend, out):
    return _lse(q)


@torch.library.custom_op("portable_attn::paged_attention", mutates_args=("out",))
def _paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seqused_k: Tensor,
                     cu_seqlens_q: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                     causal: bool, window_size: Sequence[int], softcap: float, sinks: Optional[Tensor],
                     softmax_scale: Optional[float], mask_layout: Optional[Tensor], mask_index: Optional[Tensor],
                     mask_masks: Optional[Tensor], mask_block: Sequence[int], mask_seq_len: Optional[int],
                     backend: Optional[str], out: Tensor) -> Tensor:
    _, lse = _eager("paged_attention", dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seqused_k=seqused_k,
        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
        window_size=tuple(window_size), softcap=softcap, sinks=sinks, softmax_scale=softmax_scale,
        block_mask=_mask(mask_layout, mask_index, mask_masks, mask_block, mask_seq_len), return_lse=True, out=out,
        backend=backend))
    return lse


@_paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, window_size,
      softcap, sinks, softmax_scale, mask_layout, mask_index, mask_masks, mask_block, mask_seq_len, backend, out):
    return _lse(q)


@torch.library.custom_op("portable_attn::sparse_attention", mutates_args=("out",))
def _sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, cu_seqlens_q: Optional[Tensor],
                      cu_seqlens_k: Optional[Tensor], softcap: float, sinks: Optional[Tensor],
                      softmax_scale: Optional[float], backend: Optional[str], out: Tensor) -> Tensor:
    _, lse = _eager("sparse_attention", dict(
        q=q, k=k, v=v, indices=indices, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, softcap=softcap,
        sinks=sinks, softmax_scale=softmax_scale, return_lse=True, out=out, backend=backend))
    return lse


@_sparse_attention.register_fake
def _(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, softcap, sinks, softmax_scale, backend, out):
    return _lse(q)


@torch.library.custom_op("portable_attn::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                    backend: Optional[str]) -> None:
    _eager("write_kv_cache", dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                                  backend=backend))


@_write_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, backend):
    return None


# the recurrent ops' arguments, as the public op orders them (without backend and out)
RECURRENT = {
    "linear_attention": "Tensor q, Tensor k, Tensor v, Tensor? g, float? scale, Tensor(a!)? initial_state, "
                        "bool output_final_state, Tensor? state_indices, Tensor? has_initial_state, Tensor? cu_seqlens",
    "linear_attention_step": "Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor? g, float? scale, "
                             "Tensor? state_indices",
    "gated_delta_rule": "Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float? scale, "
                        "Tensor(a!)? initial_state, bool output_final_state, Tensor? state_indices, "
                        "Tensor? has_initial_state, Tensor? cu_seqlens, bool use_qk_l2norm",
    "gated_delta_rule_step": "Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, float? scale, "
                             "Tensor? state_indices, bool use_qk_l2norm",
    "ssd": "Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
           "bool dt_softplus, float[] dt_limit, Tensor(a!)? initial_state, bool output_final_state, "
           "Tensor? state_indices, Tensor? has_initial_state, Tensor? cu_seqlens",
    "ssd_step": "Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor(a!) state, Tensor? D, Tensor? z, "
                "Tensor? dt_bias, bool dt_softplus, float[] dt_limit, Tensor? state_indices",
    "causal_conv1d": "Tensor x, Tensor weight, Tensor? bias, str? activation, Tensor(a!)? initial_state, "
                     "bool output_final_state, Tensor? state_indices, Tensor? has_initial_state, Tensor? cu_seqlens",
    "causal_conv1d_step": "Tensor x, Tensor weight, Tensor? bias, Tensor(a!) state, str? activation, "
                          "Tensor? state_indices",
}
OPS = ATTENTION + ("write_kv_cache",) + tuple(RECURRENT)


def _names(op: str) -> list:
    return [arg.split()[-1] for arg in RECURRENT[op].split(", ")] + ["backend", "out"]


def _state_tail(op: str, a: dict) -> tuple:
    """The state shape of one sequence of sequence form `op`."""
    if op == "linear_attention":
        return a["q"].shape[1], a["q"].shape[2], a["v"].shape[2]
    if op == "gated_delta_rule":
        return a["v"].shape[1], a["q"].shape[2], a["v"].shape[2]
    if op == "ssd":
        return a["x"].shape[1], a["x"].shape[2], a["B"].shape[2]
    return a["x"].shape[1], a["weight"].shape[1] - 1


def _new_final(op: str, a: dict):
    """What a sequence form's custom op returns: its new final state, else an empty tensor."""
    if a["state_indices"] is not None or not a["output_final_state"]:
        return a["out"].new_empty(0)
    init = a["initial_state"]
    if init is not None:
        return init.new_empty(init.shape)
    nseq = 1 if a["cu_seqlens"] is None else a["cu_seqlens"].shape[0] - 1
    dtype = a["x"].dtype if op == "causal_conv1d" else torch.float32
    return a["out"].new_empty((nseq,) + tuple(_state_tail(op, a)), dtype=dtype)


def _register(op: str) -> None:
    names = _names(op)
    step = op.endswith("_step")
    schema = f"({RECURRENT[op]}, str? backend, Tensor(b!) out) -> {'()' if step else 'Tensor'}"
    mutated = ("state" if step else "initial_state", "out")

    def run(*args):
        a = dict(zip(names, args))
        result = _eager(op, a)
        if step:
            return None
        if a["state_indices"] is None and a["output_final_state"]:
            return result[1].contiguous()
        return a["out"].new_empty(0)

    def fake(*args):
        return None if step else _new_final(op, dict(zip(names, args)))

    torch.library.custom_op(f"portable_attn::{op}", run, mutates_args=mutated, schema=schema).register_fake(fake)


for _op in RECURRENT:
    _register(_op)


def _recurrent(op: str, a: dict, backend: str | None):
    """The public recurrent op's return value, through its custom op."""
    out = a["out"]
    if out is None:
        like = a["v"] if "v" in a else a["x"]
        out = like.new_empty(like.shape)
    a = dict(a, out=out, backend=backend)
    if "dt_limit" in a:
        a["dt_limit"] = [float(x) for x in a["dt_limit"]]
    final = getattr(torch.ops.portable_attn, op)(*(a[n] for n in _names(op)))
    if op.endswith("_step"):
        return out
    if a["state_indices"] is not None:
        return out, a["initial_state"] if a["output_final_state"] else None
    return out, final if a["output_final_state"] else None


def _backend(spec) -> str | None:
    if spec is None or isinstance(spec, str):
        return spec
    return ",".join(spec)


def compiled(op: str, args: dict):
    """The public op `op` with its arguments by name (`backend` included, defaults filled in), as one
    custom-op call that dynamo records; the public op's return value."""
    a = dict(args)
    backend = _backend(a.pop("backend", None))
    if op == "write_kv_cache":
        torch.ops.portable_attn.write_kv_cache(a["k"], a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"],
                                               backend)
        return None
    if op in RECURRENT:
        return _recurrent(op, a, backend)
    q = a["q"]
    out = a["out"]
    if out is None:
        dv = a["v_cache"].shape[3] if op == "paged_attention" else a["v"].shape[2]
        out = q.new_empty((q.shape[0], q.shape[1], dv))
    if op == "sparse_attention":
        lse = torch.ops.portable_attn.sparse_attention(
            q, a["k"], a["v"], a["indices"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["softcap"], a["sinks"],
            a["softmax_scale"], backend, out)
    elif op == "attention":
        lse = torch.ops.portable_attn.attention(
            q, a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
            a["causal"], tuple(a["window_size"]), a["softcap"], a["sinks"], a["softmax_scale"],
            backend=backend, out=out, **_mask_args(a["block_mask"]))
    else:
        lse = torch.ops.portable_attn.paged_attention(
            q, a["k_cache"], a["v_cache"], a["block_table"], a["seqused_k"], a["cu_seqlens_q"], a["max_seqlen_q"],
            a["max_seqlen_k"], a["causal"], tuple(a["window_size"]), a["softcap"], a["sinks"], a["softmax_scale"],
            backend=backend, out=out, **_mask_args(a["block_mask"]))
    return (out, lse) if a["return_lse"] else out
