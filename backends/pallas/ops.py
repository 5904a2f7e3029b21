"""Every op of the pallas backend for the torch API, by name: the torch tensors are padded to shape
buckets (buckets.py, in torch: nothing compiles) and cross to jax (bridge.py), the jax functions of this
backend run, and results (padding cut off) and cache rows come back."""
from __future__ import annotations

from portable_attn.optable import OPS

from . import attention as _attention
from . import bridge, buckets
from . import cache as _cache
from . import conv as _conv
from . import delta as _delta
from . import linear as _linear
from . import merge as _merge
from . import paged as _paged
from . import sparse as _sparse
from . import ssd as _ssd


def _run(op: str, fn, args: dict):
    """fn on the bucketed arguments: (its result, the Cut that trims it)."""
    padded, cut = buckets.bucket(op, args)
    return fn(**bridge.arguments(padded)), cut


def _attention_family(op: str, fn, args: dict):
    o, cut = _run(op, fn, args)
    dev = args[OPS[op].primary].device
    if args["return_lse"]:
        return (bridge.result(cut.tokens(bridge.to_torch(o[0], dev)), args["out"]),
                cut.lse(bridge.to_torch(o[1], dev)))
    return bridge.result(cut.tokens(bridge.to_torch(o, dev)), args["out"])


def attention(**args):
    return _attention_family("attention", _attention.attention, args)


def paged_attention(**args):
    return _attention_family("paged_attention", _paged.paged_attention, args)


def sparse_attention(**args):
    return _attention_family("sparse_attention", _sparse.sparse_attention, args)


def merge_attention_states(**args):
    return _attention_family("merge_attention_states", _merge.merge_attention_states, args)


def write_kv_cache(**args):
    (kc, vc), _ = _run("write_kv_cache", _cache.write_kv_cache, args)
    k_cache, v_cache, slot_mapping = args["k_cache"], args["v_cache"], args["slot_mapping"]
    bridge.copy_slots(k_cache, kc, slot_mapping)
    bridge.copy_slots(v_cache, vc, slot_mapping)
    return None


def _sequence(op: str, fn, args: dict):
    """Sequence forms: (out, final_state) as docs/spec.md "Precisions" says; a cache is updated in place."""
    (y, state), cut = _run(op, fn, args)
    dev = next(v for v in args.values() if hasattr(v, "device")).device
    out = bridge.result(cut.tokens(bridge.to_torch(y, dev)), args["out"])
    init, rows = args["initial_state"], args["state_indices"]
    if rows is not None:
        bridge.copy_rows(init, state, rows)
        return out, init if args["output_final_state"] else None
    if state is None or not args["output_final_state"]:
        return out, None
    final = cut.states(bridge.to_torch(state, dev))
    return out, final.to(init.dtype) if init is not None else final


def _step(op: str, fn, args: dict):
    """Step forms: out; the state cache updated in place at state_indices."""
    (y, state), cut = _run(op, fn, args)
    bridge.copy_rows(args["state"], state, args["state_indices"])
    return bridge.result(cut.tokens(bridge.to_torch(y, args["state"].device)), args["out"])


def linear_attention(**args):
    return _sequence("linear_attention", _linear.linear_attention, args)


def linear_attention_step(**args):
    return _step("linear_attention_step", _linear.linear_attention_step, args)


def gated_delta_rule(**args):
    return _sequence("gated_delta_rule", _delta.gated_delta_rule, args)


def gated_delta_rule_step(**args):
    return _step("gated_delta_rule_step", _delta.gated_delta_rule_step, args)


def ssd(**args):
    return _sequence("ssd", _ssd.ssd, args)


def ssd_step(**args):
    return _step("ssd_step", _ssd.ssd_step, args)


def causal_conv1d(**args):
    return _sequence("causal_conv1d", _conv.causal_conv1d, args)


def causal_conv1d_step(**args):
    return _step("causal_conv1d_step", _conv.causal_conv1d_step, args)
