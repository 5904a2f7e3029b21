"""The JAX front: the operators of docs/spec.md on jax.Arrays, run by the pallas backend (Pallas TPU kernels;
Pallas' TPU interpret mode off-TPU, with PORTABLE_ATTN_INTERPRET=1). Usable under jax.jit.

Same names and arguments as the torch API, checked by the same code (checks.py, on placeholders of the
arrays' shapes and dtypes; index values are checked in eager mode and skipped while jax.jit traces).
There is no `out=` and nothing is updated in place: ops that update caches return them (donated)
- `write_kv_cache` returns `(k_cache, v_cache)`, the step forms `(out, state)`, and the sequence forms
`(out, final_state)` where with `state_indices` `final_state` is the whole updated cache.
`block_mask` is a `portable_attn.BlockMask` on the CPU: host data, like the constructors that build it.
Arrays that are not JAX arrays (torch tensors, NumPy arrays) are refused with a TypeError.
Eager calls pad ragged sizes to shape buckets (backends/pallas/buckets.py) before the kernels, so that
those compile a bounded set of executables; the pad and the final slice are small XLA ops compiled once
per new input shape (none when a size already sits on the ladder). Under the caller's jax.jit nothing
is padded: the caller's shapes are what it compiles.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch

from . import checks, dispatch, registry
from .backend import Call
from .optable import OPS
from .platforms import Platform, platform_of

INF = math.inf
INDICES = {"cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "block_table", "seqused_k", "indices", "state_indices",
           "slot_mapping", "has_initial_state"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "bool": torch.bool}


def _placeholder(name: str, x, concrete: bool):
    """What checks.py sees of a jax array: its values (index arrays in eager mode), else a tensor of its
    shape and dtype that holds one element."""
    if not isinstance(x, jax.Array):
        return x
    dtype = _TORCH.get(np.dtype(x.dtype).name)
    if dtype is None:
        raise TypeError(f"{name}: dtype {x.dtype} is not one of {', '.join(_TORCH)}")
    if concrete and name in INDICES:
        return torch.from_numpy(np.array(x))
    return torch.empty((1,) * x.ndim, dtype=dtype).expand(x.shape)


def _impl(op: str):
    from .backends.pallas import jax_ops

    return getattr(jax_ops, op)


def _donated(op: str, args: dict) -> tuple:
    """The caches an op updates, returned new (donated): a sequence form's only with state_indices."""
    decl = OPS[op]
    if decl.family == "recurrent" and not decl.is_step and args.get("state_indices") is None:
        return ()
    return decl.mutates


def _platform(first, traced: bool) -> Platform:
    """A traced array has no device yet: the platform jax compiles for."""
    if not traced:
        return platform_of(first)
    return {"tpu": Platform.TPU, "gpu": Platform.CUDA, "cuda": Platform.CUDA,
            "rocm": Platform.ROCM}.get(jax.default_backend(), Platform.CPU)


@functools.cache
def _donating(op: str, names: tuple, statics: tuple, donate: tuple):
    fn = _impl(op)
    return jax.jit(lambda *xs: fn(**dict(zip(names, xs)), **dict(statics)),
                   donate_argnums=tuple(i for i, n in enumerate(names) if n in donate))


def _check(op: str, args: dict) -> Call:
    """checks.py on placeholders, then the pallas backend's own reasons (the selection every call takes, with
    `backend="pallas"`); the call's arguments normalised (scales resolved, windows as int pairs, default
    state_indices), as jax arrays."""
    for name, x in args.items():
        if isinstance(x, (np.ndarray, torch.Tensor)) or (hasattr(x, "__dlpack__") and not isinstance(x, jax.Array)):
            raise TypeError(f"{name}: expected a jax.Array, got {type(x).__module__}.{type(x).__qualname__} "
                            f"(convert it with jnp.asarray)")
    traced = any(isinstance(x, jax.core.Tracer) for x in args.values())
    token = checks.VALUES_UNKNOWN.set(traced)
    try:
        call = dispatch.make_call(op, {n: _placeholder(n, x, not traced) for n, x in args.items()})
    finally:
        checks.VALUES_UNKNOWN.reset(token)
    first = next(x for x in args.values() if isinstance(x, jax.Array))
    call = Call(op, call.args, _platform(first, traced))
    registry.select(call, "pallas")  # raises BackendUnavailable / NotSupported with the reason
    norm = {n: args[n] if isinstance(args.get(n), jax.Array) else x for n, x in call.args.items()}
    if OPS[op].is_step and args.get("state_indices") is None:
        norm["state_indices"] = jnp.arange(args[next(iter(args))].shape[0], dtype=jnp.int32)
    norm.pop("out", None)
    return Call(op, norm, call.platform)


def _trim(op: str, result, cut, args: dict):
    """The op's result with the bucket padding cut off (caches are never padded)."""
    decl = OPS[op]
    if decl.family == "attention":
        return (cut.tokens(result[0]), cut.lse(result[1])) if args["return_lse"] else cut.tokens(result)
    if decl.family == "cache":
        return result
    y, state = result
    keep = decl.is_step or args["state_indices"] is not None     # the whole cache
    return cut.tokens(y), state if keep else cut.states(state)


def _run(op: str, args: dict):
    from .backends.pallas import buckets

    call = _check(op, args)
    a = call.args
    if any(isinstance(x, jax.core.Tracer) for x in a.values()):
        return _impl(op)(**a)  # the caller's jax.jit compiles its own shapes; donation is its donate_argnums
    padded, cut = buckets.bucket(op, a)   # eager: a bounded set of compiled shapes
    donate = _donated(op, a)
    if not donate:
        return _trim(op, _impl(op)(**padded), cut, a)
    names = tuple(n for n, x in padded.items() if isinstance(x, jax.Array))
    statics = tuple((n, x) for n, x in padded.items() if n not in names)
    return _trim(op, _donating(op, names, statics, donate)(*(padded[n] for n in names)), cut, a)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False):
    """Scaled dot-product attention over packed varlen sequences; `o [Tq, Hq, Dv]` (and `lse [Hq, Tq]`)."""
    return _run("attention", locals())


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False):
    """Attention over a paged KV cache (decode when `cu_seqlens_q` is None, else chunked prefill)."""
    return _run("paged_attention", locals())


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """`(k_cache, v_cache)` with token t written at slot `slot_mapping[t]` (-1 skips it); caches donated."""
    return _run("write_kv_cache", locals())


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False):
    """Attention over the key positions listed per query and kv head in `indices [Tq, Hkv, topk]`."""
    return _run("sparse_attention", locals())


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks=None, return_lse=False):
    """Two attention results over disjoint key sets merged by their lse; `o [T, H, Dv]` (and `lse [H, T]`)."""
    return _run("merge_attention_states", locals())


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None):
    """(Gated) linear attention; `(out, final_state)` (the updated cache with `state_indices`)."""
    return _run("linear_attention", locals())


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None):
    """One decode token per sequence of `linear_attention`; `(out, state)`."""
    return _run("linear_attention_step", locals())


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False):
    """Gated delta rule; `(out, final_state)` (the updated cache with `state_indices`)."""
    return _run("gated_delta_rule", locals())


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False):
    """One decode token per sequence of `gated_delta_rule`; `(out, state)`."""
    return _run("gated_delta_rule_step", locals())


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF), initial_state=None,
        output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None):
    """Mamba-2 state-space duality scan; `(y, final_state)` (the updated cache with `state_indices`)."""
    return _run("ssd", locals())


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
             state_indices=None):
    """One decode token per sequence of `ssd`; `(y, state)`."""
    return _run("ssd_step", locals())


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None):
    """Depthwise causal conv1d over packed sequences; `(y, final_state)` (the updated cache with
    `state_indices`)."""
    return _run("causal_conv1d", locals())


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None):
    """One decode token per sequence of `causal_conv1d`; `(y, state)`."""
    return _run("causal_conv1d_step", locals())
