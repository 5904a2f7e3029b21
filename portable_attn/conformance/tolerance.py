"""The tolerance rule: a backend's error against the float64 reference may be a small multiple of the
error the reference algorithm itself makes in the low precision, above an absolute floor per dtype
(the FlashAttention test methodology). NaN never passes."""
from __future__ import annotations

import dataclasses

import torch

FACTOR = 3.0
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass
class Verdict:
    ok: bool
    err: float
    tol: float
    detail: str = ""


def compare(got: torch.Tensor, oracle: torch.Tensor, emulated: torch.Tensor, dtype: torch.dtype) -> Verdict:
    """Check `got` against the float64 `oracle`, with the budget set by `emulated`'s error."""
    if tuple(got.shape) != tuple(oracle.shape):
        return Verdict(False, float("inf"), 0.0, f"shape {tuple(got.shape)} != {tuple(oracle.shape)}")
    g, o, e = (t.detach().to("cpu", torch.float64) for t in (got, oracle, emulated))
    if g.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    if bool(torch.isnan(g).any()):
        n = int(torch.isnan(g).sum())
        return Verdict(False, float("nan"), 0.0, f"{n} NaN element(s) (unwritten or masked badly)")
    inf = torch.isinf(o)
    if bool((g[inf] != o[inf]).any()) or bool(torch.isinf(g[~inf]).any()):
        return Verdict(False, float("inf"), 0.0, "infinities differ from the reference (e.g. lse of an empty row)")
    fin = ~inf
    err = float((g[fin] - o[fin]).abs().max()) if bool(fin.any()) else 0.0
    base = float((e[fin] - o[fin]).abs().max()) if bool(fin.any()) else 0.0
    scale = max(1.0, float(o[fin].abs().max())) if bool(fin.any()) else 1.0
    tol = FACTOR * base + FLOOR[dtype] * scale
    return Verdict(err <= tol, err, tol)


def combine(verdicts: dict[str, Verdict]) -> Verdict:
    """One verdict for several outputs: the worst ratio, failing if any fails."""
    if not verdicts:
        return Verdict(True, 0.0, 0.0)
    bad = {k: v for k, v in verdicts.items() if not v.ok}
    name, worst = max(bad.items() if bad else verdicts.items(),
                      key=lambda kv: kv[1].err / kv[1].tol if kv[1].tol else (0.0 if kv[1].ok else float("inf")))
    detail = f"{name}: err {worst.err:.3g} > tol {worst.tol:.3g}" if bad else ""
    if bad and worst.detail:
        detail = f"{name}: {worst.detail}"
    return Verdict(not bad, worst.err, worst.tol, detail)
