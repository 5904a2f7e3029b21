"""What the torch backend computes exactly as SPEC says, checked on the host before anything runs."""
from __future__ import annotations

from portable_attn.backend import Call

from .bands import bounds, rect

MAX_MASK = 1 << 26  # mask elements per sequence (heads x rows x keys): SDPA takes it as a float bias, 256 MiB fp32


def why_not(call: Call) -> str | None:
    """None when SDPA computes this call as SPEC says, else the reason."""
    if call.op == "write_kv_cache":
        return None  # any shape, strides, block size and slot dtype
    a = call.args
    if a["softcap"] > 0:
        return "softcap: SDPA applies no score modifier"
    device = a["q"].device.type
    if device != "cpu" and (a["return_lse"] or a["sinks"] is not None):
        return (f"return_lse and sinks (which need lse) on {device}: SDPA returns no log-sum-exp there "
                f"(only the CPU's flash kernel does)")
    k, v = (a["k"], a["v"]) if call.op == "attention" else (a["k_cache"], a["v_cache"])
    if a["q"].device.type == "cpu" and k.shape[-1] != v.shape[-1]:
        return f"key dim {k.shape[-1]} != value dim {v.shape[-1]}: the CPU flash kernel takes one head dim"
    return _mask_reason(call)


def _mask_reason(call: Call) -> str | None:
    """A window, a bottom-right causal band that SDPA's top-left is_causal is not, or a block mask
    becomes a dense bool mask of (block-mask heads x) rows x keys for a sequence: bounded."""
    a = call.args
    paged = call.op == "paged_attention"
    if paged and a["cu_seqlens_q"] is None and a["block_mask"] is None:
        return None  # decode: one row per sequence
    bm = a["block_mask"]
    heads = bm.layout.shape[1] if bm is not None else 1
    for lq, lk in _lengths(a, paged):
        r = rect(lq, lk, a["causal"], a["window_size"])
        rows, keys = r.r1 - r.r0, r.k1 - r.k0
        dense = bm is not None or (r.masked and not (r.top_left and a["softmax_scale"] != 0))
        if dense and heads * rows * keys > MAX_MASK:
            return (f"a dense mask of {heads} x {rows} x {keys} elements (window, bottom-right causal or block "
                    f"mask) is above {MAX_MASK}; the cpu and triton backends tile such calls")
    return None


def _lengths(a: dict, paged: bool):
    """(query count, key count) of each sequence of the call (host ints: one sync per index tensor)."""
    q = [e - s for s, e in bounds(a["cu_seqlens_q"], a["q"].shape[0])]
    if paged:
        q = q if a["cu_seqlens_q"] is not None else [1] * a["q"].shape[0]
        return zip(q, a["seqused_k"].tolist())
    return zip(q, [e - s for s, e in bounds(a["cu_seqlens_k"], a["k"].shape[0])])
