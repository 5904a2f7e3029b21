"""Every op of the pallas backend for the torch API, by name: the torch tensors cross to jax
(bridge.py), the jax functions of this backend run, and results and cache rows come back."""
from __future__ import annotations

from . import attention as _attention
from . import bridge
from . import cache as _cache
from . import conv as _conv
from . import delta as _delta
from . import linear as _linear
from . import paged as _paged
from . import sparse as _sparse
from . import ssd as _ssd


def _attention_family(fn, args: dict):
    o = fn(**bridge.arguments(args))
    dev = args["q"].device
    if args["return_lse"]:
        return bridge.result(o[0], args["out"], dev), bridge.to_torch(o[1], dev)
    return bridge.result(o, args["out"], dev)


def attention(**args):
    return _attention_family(_attention.attention, args)


def paged_attention(**args):
    return _attention_family(_paged.paged_attention, args)


def sparse_attention(**args):
    return _attention_family(_sparse.sparse_attention, args)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    kc, vc = _cache.write_kv_cache(*map(bridge.to_jax, (k, v, k_cache, v_cache, slot_mapping)))
    bridge.copy_slots(k_cache, kc, slot_mapping)
    bridge.copy_slots(v_cache, vc, slot_mapping)
    return None


def _sequence(fn, args: dict):
    """Sequence forms: (out, final_state) as docs/spec.md "Precisions" says; a cache is updated in place."""
    y, state = fn(**bridge.arguments(args))
    dev = next(v for v in args.values() if hasattr(v, "device")).device
    out = bridge.result(y, args["out"], dev)
    init, rows = args["initial_state"], args["state_indices"]
    if rows is not None:
        bridge.copy_rows(init, state, rows)
        return out, init if args["output_final_state"] else None
    if state is None or not args["output_final_state"]:
        return out, None
    final = bridge.to_torch(state, dev)
    return out, final.to(init.dtype) if init is not None else final


def _step(fn, args: dict):
    """Step forms: out; the state cache updated in place at state_indices."""
    y, state = fn(**bridge.arguments(args))
    bridge.copy_rows(args["state"], state, args["state_indices"])
    return bridge.result(y, args["out"], args["state"].device)


def linear_attention(**args):
    return _sequence(_linear.linear_attention, args)


def linear_attention_step(**args):
    return _step(_linear.linear_attention_step, args)


def gated_delta_rule(**args):
    return _sequence(_delta.gated_delta_rule, args)


def gated_delta_rule_step(**args):
    return _step(_delta.gated_delta_rule_step, args)


def ssd(**args):
    return _sequence(_ssd.ssd, args)


def ssd_step(**args):
    return _step(_ssd.ssd_step, args)


def causal_conv1d(**args):
    return _sequence(_conv.causal_conv1d, args)


def causal_conv1d_step(**args):
    return _step(_conv.causal_conv1d_step, args)
