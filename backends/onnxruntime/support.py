"""What the onnxruntime backend runs: the ops whose ONNX kernel a chosen execution provider registers (read
from the installed build, kernels.py), and attention calls whose dense visibility mask stays bounded."""
from __future__ import annotations

from portable_attn.backend import Call

MAX_MASK = 2 ** 28  # elements of an attention call's dense visibility mask (bool [1|Hq, Tq, Tk])


def why_not(call: Call) -> str | None:
    """None when the onnxruntime graphs run this call, else the reason."""
    from . import kernels  # imports onnxruntime: only once the backend is known to be available

    missing = kernels.why_missing(call.op)
    if missing:
        return missing
    a = call.args
    if call.op in ("attention", "paged_attention"):
        bm = a["block_mask"]
        heads = bm.layout.shape[1] if bm is not None else 1
        keys = a["k"].shape[0] if call.op == "attention" else int(a["seqused_k"].sum())
        if heads * a["q"].shape[0] * keys > MAX_MASK:
            return (f"the dense visibility mask ({heads} x {a['q'].shape[0]} queries x {keys} keys) would pass "
                    f"{MAX_MASK} elements")
    return None
