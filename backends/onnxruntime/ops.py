"""Every op of the onnxruntime backend, by name: the host prepares float32 inputs (masks, gather indices,
the state rows a call reads), the cached graph runs (sessions.py), results and state rows go back where
docs/spec.md says. States go through the cpu backend's helpers (one copy of the "States" rules)."""
from __future__ import annotations

import torch

from portable_attn.backends.cpu.states import emit, finish, gather, initial_states, scatter

from . import attention as _attention
from . import sessions


def attention(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size, softcap,
              sinks, softmax_scale, block_mask, return_lse, out):
    a = locals()
    kb = _attention.bounds(cu_seqlens_k, k.shape[0])
    feeds = _attention.dense(a, q, k.shape[1], _attention.bounds(cu_seqlens_q, q.shape[0]), kb)
    return _attention.run("attention", a, q, v.shape[2], feeds | {"k": k.float(), "v": v.float()}, k.shape[0])


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                    causal, window_size, softcap, sinks, softmax_scale, block_mask, return_lse, out):
    a = locals()
    slots, kb = _attention.paged_slots(a)
    qb = (_attention.bounds(cu_seqlens_q, q.shape[0]) if cu_seqlens_q is not None
          else [(i, i + 1) for i in range(block_table.shape[0])])  # decode: one query per sequence
    feeds = _attention.dense(a, q, k_cache.shape[2], qb, kb)
    return _attention.run("attention", a, q, v_cache.shape[3],
                          feeds | {"slots": slots, "k_cache": k_cache.flatten(0, 1).float(),
                                   "v_cache": v_cache.flatten(0, 1).float()}, slots.numel())


def sparse_attention(q, k, v, indices, *, cu_seqlens_q, cu_seqlens_k, softcap, sinks, softmax_scale, return_lse,
                     out):
    a = locals()
    feeds = _attention.sparse(a, q, k) | {"k": k.flatten(0, 1).float(), "v": v.flatten(0, 1).float()}
    return _attention.run("sparse_attention", a, q, v.shape[2], feeds, k.shape[0] and indices.shape[2])


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks, return_lse, out):
    t, h, dv = o_a.shape
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    o = out if direct else torch.empty(t, h, dv)
    lse = torch.empty(h, t)
    if t:
        inputs = {"o_a": o_a.float(), "lse_a": lse_a.float(), "o_b": o_b.float(), "lse_b": lse_b.float()}
        if sinks is not None:
            inputs["sinks"] = sinks.float()
        sessions.run("merge_attention_states", {"sinks": sinks is not None}, inputs, {"out": o, "lse": lse})
    if not direct:
        o = o.to(o_a.dtype) if out is None else out.copy_(o)
    return (o, lse) if return_lse else o


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, keep).long()
    if not slots.numel():
        return None
    for x, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.flatten(0, 1)  # [NB * BS, Hkv, d]: a view where the cache allows it
        new = torch.empty(flat.shape)
        sessions.run("write_kv_cache", {}, {"cache": flat.float(), "slots": slots[:, None],
                                            "rows": x.index_select(0, keep).float()}, {"new": new})
        cache[slots // cache.shape[1], slots % cache.shape[1]] = new.index_select(0, slots).to(cache.dtype)
    return None


# ---- recurrent family -------------------------------------------------------------------------

def _sequences(kind: str, sig: dict, feeds: dict, like, tail: tuple, a: dict, state_dtype=torch.float32):
    """A sequence form: every sequence from its initial state (docs/spec.md "States"), the graph over the
    sequences that have tokens (the others keep their state), final states where they go."""
    n_tok = like.shape[0]
    cu = a["cu_seqlens"] if a["cu_seqlens"] is not None else torch.tensor([0, n_tok], dtype=torch.int32)
    lens = (cu[1:] - cu[:-1]).long()
    states = initial_states(a["initial_state"], a["state_indices"], a["has_initial_state"], lens.numel(), tail,
                            like.device)
    y = torch.empty(like.shape)
    busy = (lens > 0).nonzero().squeeze(1)
    if busy.numel():
        part = lens.index_select(0, busy)
        final = torch.empty((busy.numel(),) + tuple(tail))
        sessions.run(kind, sig, feeds | {"cu": torch.cat([part.new_zeros(1), part.cumsum(0)]).int(),
                                         "state": states.index_select(0, busy)}, {"out": y, "final": final})
        states.index_copy_(0, busy, final)
    out = emit(y, a["out"], like.dtype)
    return out, finish(states, a["initial_state"], a["state_indices"], a["output_final_state"], state_dtype)


def _step(kind: str, sig: dict, feeds: dict, like, state, state_indices, out):
    """A step form: one token per sequence, the same graph with cu_seqlens = arange, rows updated in place."""
    bsz = like.shape[0]
    s = gather(state, state_indices)
    y = torch.empty(like.shape)
    if bsz:
        final = torch.empty_like(s)
        sessions.run(kind, sig, feeds | {"cu": torch.arange(bsz + 1, dtype=torch.int32), "state": s},
                     {"out": y, "final": final})
        scatter(state, state_indices, final)
    return emit(y, out, like.dtype)


def _delta_feeds(q, k, v, g, beta, scale, use_qk_l2norm) -> tuple[dict, dict]:
    rule = ("gated_delta" if beta is not None else "gated") if g is not None else "linear"
    sig = {"rule": rule, "per_key": g is not None and g.dim() == 3, "l2norm": bool(use_qk_l2norm),
           "scale": float(scale)}
    feeds = {"q": q.float(), "k": k.float(), "v": v.float()}
    if g is not None:
        feeds["g"] = g.float()
    if beta is not None:
        feeds["beta"] = beta.float()
    return sig, feeds


def linear_attention(q, k, v, *, g, scale, initial_state, output_final_state, state_indices, has_initial_state,
                     cu_seqlens, out):
    sig, feeds = _delta_feeds(q, k, v, g, None, scale, False)
    return _sequences("delta_rule", sig, feeds, v, (q.shape[1], q.shape[2], v.shape[2]), locals())


def linear_attention_step(q, k, v, *, state, g, scale, state_indices, out):
    sig, feeds = _delta_feeds(q, k, v, g, None, scale, False)
    return _step("delta_rule", sig, feeds, v, state, state_indices, out)


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, output_final_state, state_indices,
                     has_initial_state, cu_seqlens, use_qk_l2norm, out):
    sig, feeds = _delta_feeds(q, k, v, g, beta, scale, use_qk_l2norm)
    return _sequences("delta_rule", sig, feeds, v, (v.shape[1], q.shape[2], v.shape[2]), locals())


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale, state_indices, use_qk_l2norm, out):
    sig, feeds = _delta_feeds(q, k, v, g, beta, scale, use_qk_l2norm)
    return _step("delta_rule", sig, feeds, v, state, state_indices, out)


def _ssd_feeds(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit) -> tuple[dict, dict]:
    sig = {"dt_bias": dt_bias is not None, "softplus": bool(dt_softplus), "dt_limit": tuple(dt_limit),
           "D": D is not None, "z": z is not None}
    feeds = {"x": x.float(), "dt": dt.float(), "A": A.float(), "B": B.float(), "C": C.float()}
    if D is not None:
        feeds["D"] = D.float().reshape(x.shape[1], -1)  # [H] -> [H, 1]
    for name, t in (("z", z), ("dt_bias", dt_bias)):
        if t is not None:
            feeds[name] = t.float()
    return sig, feeds


def ssd(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, dt_limit, initial_state, output_final_state, state_indices,
        has_initial_state, cu_seqlens, out):
    sig, feeds = _ssd_feeds(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    return _sequences("ssd", sig, feeds, x, (x.shape[1], x.shape[2], B.shape[2]), locals())


def ssd_step(x, dt, A, B, C, *, state, D, z, dt_bias, dt_softplus, dt_limit, state_indices, out):
    sig, feeds = _ssd_feeds(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    return _step("ssd", sig, feeds, x, state, state_indices, out)


def _conv_feeds(x, weight, bias, activation) -> tuple[dict, dict]:
    feeds = {"x": x.float(), "weight": weight.float()}
    if bias is not None:
        feeds["bias"] = bias.float()
    return {"bias": bias is not None, "activation": activation}, feeds


def causal_conv1d(x, weight, bias, *, activation, initial_state, output_final_state, state_indices,
                  has_initial_state, cu_seqlens, out):
    sig, feeds = _conv_feeds(x, weight, bias, activation)
    return _sequences("causal_conv1d", sig, feeds, x, (x.shape[1], weight.shape[1] - 1), locals(), x.dtype)


def causal_conv1d_step(x, weight, bias, *, state, activation, state_indices, out):
    sig, feeds = _conv_feeds(x, weight, bias, activation)
    return _step("causal_conv1d", sig, feeds, x, state, state_indices, out)
