"""The public operators of SPEC.md: check the arguments once, pick a backend, run it.

Each op takes `backend=` (a name or a priority list) on top of SPEC's arguments. Sequence forms of
the recurrent ops return `(out, final_state)` (final_state None unless `output_final_state`); step
forms return `out` and update `state` in place.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch

from . import checks, registry
from .backend import Call
from .platforms import platform_of

INF = math.inf


CHECKS = {
    "attention": checks.check_attention,
    "paged_attention": checks.check_paged_attention,
    "write_kv_cache": checks.check_write_kv_cache,
    "sparse_attention": checks.check_sparse_attention,
    "linear_attention": checks.check_linear_attention,
    "linear_attention_step": functools.partial(checks.check_linear_attention, step=True),
    "gated_delta_rule": checks.check_gated_delta_rule,
    "gated_delta_rule_step": functools.partial(checks.check_gated_delta_rule, step=True),
    "ssd": checks.check_ssd,
    "ssd_step": functools.partial(checks.check_ssd, step=True),
    "causal_conv1d": checks.check_causal_conv1d,
    "causal_conv1d_step": functools.partial(checks.check_causal_conv1d, step=True),
}


def make_call(op: str, args: dict) -> Call:
    """Check `args` (the op's arguments by name; defaults filled in) and wrap them as a Call."""
    bound = inspect.signature(globals()[op]).bind(**args)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("backend")
    args = CHECKS[op](args)
    return Call(op, args, platform_of(next(iter(args.values()))))


def _dispatch(op: str, local: dict):
    if torch.compiler.is_compiling():  # dynamo records one custom op; the dispatch below runs inside it
        from .library import compiled
        return compiled(op, local)
    call = make_call(op, {k: v for k, v in local.items() if k != "backend"})
    return registry.select(call, local["backend"]).run(call)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None, backend=None):
    """Scaled dot-product attention over packed varlen sequences; `o [Tq, Hq, Dv]` (and `lse [Hq, Tq]`)."""
    return _dispatch("attention", locals())


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None, backend=None):
    """Attention over a paged KV cache (decode when `cu_seqlens_q` is None, else chunked prefill)."""
    return _dispatch("paged_attention", locals())


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend=None):
    """Write token t of k, v into cache slot `slot_mapping[t]` (-1 skips it), in place."""
    return _dispatch("write_kv_cache", locals())


def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, out=None, backend=None):
    """Attention over the key positions listed per query and kv head in `indices [Tq, Hkv, topk]`."""
    return _dispatch("sparse_attention", locals())


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, out=None, backend=None):
    """(Gated) linear attention `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`."""
    return _dispatch("linear_attention", locals())


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None, out=None, backend=None):
    """One decode token per sequence of `linear_attention`; `state` updated in place."""
    return _dispatch("linear_attention_step", locals())


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None,
                     backend=None):
    """Gated delta rule (Gated DeltaNet, Qwen3-Next; KDA with per-key-dim `g`)."""
    return _dispatch("gated_delta_rule", locals())


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False,
                          out=None, backend=None):
    """One decode token per sequence of `gated_delta_rule`; `state` updated in place."""
    return _dispatch("gated_delta_rule_step", locals())


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF), initial_state=None,
        output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None, out=None,
        backend=None):
    """Mamba-2 state-space duality scan; `y [T, H, P]`."""
    return _dispatch("ssd", locals())


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
             state_indices=None, out=None, backend=None):
    """One decode token per sequence of `ssd` (mamba's selective_state_update); `state` updated in place."""
    return _dispatch("ssd_step", locals())


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None, backend=None):
    """Depthwise causal conv1d over packed sequences; `y [T, C]`."""
    return _dispatch("causal_conv1d", locals())


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None,
                       backend=None):
    """One decode token per sequence of `causal_conv1d`; `state [slots, C, W-1]` updated in place."""
    return _dispatch("causal_conv1d_step", locals())
