"""What IPEX 2.8's kernels compute as SPEC says, checked without importing IPEX. Each refusal was found by
calling the kernel beside the float64 reference (tests/backends/ipex)."""
from __future__ import annotations

import torch

from portable_attn.backend import Call


def why_not(call: Call) -> str | None:
    """None when IPEX computes this call exactly, else the reason."""
    if call.op in ("attention", "paged_attention"):
        return _attention_reason(call)
    if call.op == "write_kv_cache":
        return _layout_reason(call.args["k_cache"], call.args["v_cache"])
    return None  # causal_conv1d_step: any shape; the state [.., C, W-1] rows are gathered and written back


def _attention_reason(call: Call) -> str | None:
    a = call.args
    for name, reason in (("return_lse", "IPEX returns no log-sum-exp"), ("sinks", "IPEX has no sink logits"),
                         ("block_mask", "IPEX takes no block mask")):
        if a[name] is not None and a[name] is not False:
            return f"{name}: {reason}"
    if a["softcap"] > 0 or a["window_size"] != (-1, -1):
        return "softcap and windows: IPEX 2.8's CPU kernels refuse them ('ipex do not support ... option')"
    if a["q"].dtype == torch.float16:
        return "float16: IPEX's CPU attention kernels take float32 and bfloat16"
    if call.op == "paged_attention":
        if a["cu_seqlens_q"] is not None:
            return "paged prefill (cu_seqlens_q): only decode (one query per sequence) is wired to IPEX"
        return _layout_reason(a["k_cache"], a["v_cache"])
    if a["causal"] and _ragged(a):
        return "causal with a sequence whose query and key counts differ: IPEX's causal mask is top-left"
    k, v = a["k"], a["v"]
    if k.shape[-1] != v.shape[-1]:
        return f"key dim {k.shape[-1]} != value dim {v.shape[-1]}: IPEX takes one head dim"
    return None


def _ragged(a: dict) -> bool:
    """Whether some sequence has a different number of queries and keys (one host sync)."""
    cq, ck = a["cu_seqlens_q"], a["cu_seqlens_k"]
    if cq is None:
        return a["q"].shape[0] != a["k"].shape[0]
    return not torch.equal(cq, ck)


def _layout_reason(k_cache, v_cache) -> str | None:
    """IPEX's kernels index a heads-major cache [NB, Hkv, BS, D]: SPEC's [NB, BS, Hkv, D] must be a view of one."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.transpose(1, 2).is_contiguous():
            return (f"{name}: IPEX reads a heads-major cache [NB, Hkv, BS, D]; pass a view of one "
                    f"(cache.transpose(1, 2)); a copy per call would cost more than the kernel saves")
    if k_cache.shape[-1] != v_cache.shape[-1]:
        return f"key dim {k_cache.shape[-1]} != value dim {v_cache.shape[-1]}: IPEX takes one head dim"
    return None
