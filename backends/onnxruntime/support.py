"""What the onnxruntime backend runs: the ops whose ONNX kernel a chosen execution provider registers (read
from the installed build, kernels.py), and attention calls whose score matrix stays bounded (ONNX `Attention`
materialises every query's scores over every key of the packed row)."""
from __future__ import annotations

from portable_attn.backend import Call

MAX_SCORES = 2 ** 28  # float32 scores of one attention call (1 GiB): Hq x Tq x Tk
GIB = 2 ** 30 / 4     # float32 values per GiB


def why_not(call: Call) -> str | None:
    """None when the onnxruntime graphs run this call, else the reason."""
    from . import kernels  # imports onnxruntime: only once the backend is known to be available

    missing = kernels.why_missing(call.op)
    if missing:
        return missing
    a = call.args
    if call.op in ("attention", "paged_attention"):
        keys = a["k"].shape[0] if call.op == "attention" else int(a["seqused_k"].sum())
        scores = a["q"].shape[1] * a["q"].shape[0] * keys
        if scores > MAX_SCORES:
            return (f"ONNX Attention would hold {scores / GIB:.1f} GiB of float32 scores ({a['q'].shape[1]} heads x "
                    f"{a['q'].shape[0]} queries x {keys} keys, packed sequences in one row); the limit is "
                    f"{MAX_SCORES / GIB:.0f} GiB")
    return None
