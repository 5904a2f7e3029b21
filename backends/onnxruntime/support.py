"""What the onnxruntime backend runs: the ops whose ONNX kernel a chosen execution provider registers (read
from the installed build, kernels.py), and attention calls whose scores and key copies stay bounded (ONNX
`Attention` materialises every query's scores over every key of the packed row; the graph copies the keys)."""
from __future__ import annotations

from portable_attn.backend import Call

MAX_SCORES = 2 ** 28  # float32 values (1 GiB) of one attention call's scores (Hq x Tq x Tk), and of its keys
GIB = 2 ** 30 / 4     # float32 values per GiB


def why_not(call: Call) -> str | None:
    """None when the onnxruntime graphs run this call, else the reason."""
    from . import kernels  # imports onnxruntime: only once the backend is known to be available

    missing = kernels.why_missing(call.op)
    if missing:
        return missing
    a = call.args
    if call.op in ("attention", "paged_attention"):
        k, v = (a["k"], a["v"]) if call.op == "attention" else (a["k_cache"], a["v_cache"])
        keys = k.shape[0] if call.op == "attention" else int(a["seqused_k"].sum())
        scores = a["q"].shape[1] * a["q"].shape[0] * keys
        if scores > MAX_SCORES:
            return (f"ONNX Attention would hold {scores / GIB:.1f} GiB of float32 scores ({a['q'].shape[1]} heads x "
                    f"{a['q'].shape[0]} queries x {keys} keys, packed sequences in one row); the limit is "
                    f"{MAX_SCORES / GIB:.0f} GiB")
        rows = keys * k.shape[-2] * (k.shape[-1] + v.shape[-1])
        if rows > MAX_SCORES:
            return (f"the graph would copy {rows / GIB:.1f} GiB of float32 keys and values ({keys} keys, gathered, "
                    f"masked and laid out heads-first); the limit is {MAX_SCORES / GIB:.0f} GiB")
    return None
