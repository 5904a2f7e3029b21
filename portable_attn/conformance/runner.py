"""Run one conformance case on one backend in one dtype: oracle, low-precision baseline, the backend
with poisoned outputs, cache rows it must not touch, and the case's invariant when it has one. A case
may also hand the backend every tensor as a strided view inside garbage, and NaN in the memory no
output may depend on (`invisible`)."""
from __future__ import annotations

import dataclasses
import time
import zlib

import numpy as np
import torch

import portable_attn
from ..errors import BackendUnavailable, NotSupported
from ..optable import OPS
from ..backends.reference.precision import emulate
from . import invisible, tensors
from .cases import Case
from .tolerance import Verdict, combine, compare

IN_PLACE = {"cache": "initial_state", "state": "state", "k_cache": "k_cache", "v_cache": "v_cache"}  # output: arg


@dataclasses.dataclass
class Result:
    backend: str
    op: str
    case: str
    dtype: str
    status: str            # pass | fail | unsupported | error
    err: float | None = None
    tol: float | None = None
    detail: str = ""
    seconds: float = 0.0


def call(op: str, inputs: dict, backend: str):
    """Run `op` on `inputs` and return its outputs by name (in-place caches included)."""
    decl = OPS[op]
    result = getattr(portable_attn, op)(**inputs, backend=backend)
    if decl.family == "attention":
        o, lse = result if inputs.get("return_lse") else (result, None)
        return {"out": o} | ({"lse": lse} if lse is not None else {})
    if decl.family == "cache":
        return {name: inputs[name] for name in decl.mutates}
    if decl.is_step:
        return {"out": result, "state": inputs["state"]}
    out, final = result
    got = {"out": out}
    if inputs.get("state_indices") is not None:
        got["cache"] = inputs["initial_state"]
    elif final is not None:
        got["final_state"] = final
    return got


def _cache_name(op: str) -> str | None:
    """The state cache a recurrent op updates in place at `state_indices`."""
    decl = OPS[op]
    return decl.mutates[0] if decl.family == "recurrent" else None


def untouched_rows(op: str, before: dict, after: dict) -> str:
    """Cache rows that no sequence lists must be bit-identical after the call."""
    name = _cache_name(op)
    idx = before.get("state_indices")
    if name is None or idx is None or before.get(name) is None:
        return ""
    listed = set(int(i) for i in idx.tolist() if i >= 0)
    rows = [r for r in range(before[name].shape[0]) if r not in listed]
    if rows and not tensors.same_bits(before[name][rows], after[name][rows]):
        return f"{name}: rows not listed in state_indices changed"
    return ""


def seed_of(case: Case) -> int:
    """Every dtype and backend sees the same values for a case."""
    return zlib.crc32(f"{case.op}/{case.name}".encode())


def run_case(backend: str, case: Case, dtype: str, device: str = "cpu") -> Result:
    start = time.perf_counter()
    res = Result(backend, case.op, case.name, dtype, "error")
    try:
        _run(backend, case, tensors.DTYPES[dtype], device, res)
    except NotSupported as exc:
        res.status, res.detail = "unsupported", exc.reason
    except BackendUnavailable as exc:
        res.status, res.detail = "unsupported", f"unavailable: {exc.reason}"
    except Exception as exc:  # a crash in a backend is a failure with its message, not a suite abort
        res.status, res.detail = "error", f"{type(exc).__name__}: {exc}"
    res.seconds = time.perf_counter() - start
    return res


def _run(backend: str, case: Case, dtype: torch.dtype, device: str, res: Result) -> None:
    raw = case.make(np.random.default_rng(seed_of(case)))
    state_dtype = dtype if case.state_in_act_dtype else torch.float32
    inputs = tensors.to_torch(raw, dtype, device, state_dtype)
    oracle = call(case.op, tensors.upcast(tensors.clone(inputs)), "reference")
    with emulate(dtype):
        emulated = call(case.op, tensors.clone(inputs), "reference")
    got, problem = run_backend(backend, case, inputs, oracle["out"].to(dtype) if "out" in oracle else None)
    verdict = combine({name: compare(got[name], oracle[name], emulated[name], dtype) for name in oracle})
    res.err, res.tol = verdict.err, verdict.tol
    # the most specific finding first: memory a call must not touch, then the error, then the invariants
    problem = problem or (verdict.detail if not verdict.ok else "")
    if not problem and case.variant is not None:
        problem = _invariant(backend, case, inputs, got, oracle, emulated, dtype)
    if not problem and case.deterministic:
        again = call(case.op, _copy(case, inputs), backend)
        if any(not torch.equal(again[n], got[n]) for n in got):
            problem = "not deterministic: the same inputs twice gave different bits"
    res.status, res.detail = ("fail", problem) if problem else ("pass", "")


def run_backend(backend: str, case: Case, inputs: dict, out_like: torch.Tensor | None) -> tuple[dict, str]:
    """Call the backend as `case` says (NaN-filled `out=`, strided views, poisoned invisible memory);
    return its outputs, made comparable with the oracle's, and what it did wrong beyond their values."""
    masks = invisible.invisible(case.op, inputs) if case.poison else {}
    before = invisible.poison(inputs, masks)
    mine = _copy(case, before)
    if out_like is not None and case.use_out and case.op != "write_kv_cache":
        mine["out"] = tensors.poisoned_like(out_like)
    mine, gaps = tensors.strided(mine, case.layout) if case.layout else (mine, {})
    got = call(case.op, mine, backend)
    problem = tensors.written_outside(gaps) or untouched_rows(case.op, before, mine)
    if not problem and "out" in mine and got["out"].data_ptr() != mine["out"].data_ptr():
        problem = "out=: the result is not the tensor passed as out="
    if not problem and "out" not in mine and "out" in got and not got["out"].is_contiguous():
        problem = f"out: a new output must be contiguous, got strides {tuple(got['out'].stride())}"
    for name, arg in IN_PLACE.items():
        if name in got and arg in masks:
            got[name] = invisible.restore(got[name], inputs[arg], masks[arg])
    return got, problem


def _copy(case: Case, inputs: dict) -> dict:
    """The inputs for one backend call, paged caches in the case's layout."""
    copy = tensors.clone(inputs)
    return tensors.heads_major(copy) if case.heads_major else copy


def _invariant(backend, case, inputs, got, oracle, emulated, dtype) -> str:
    """The variant formulation must agree with the direct call within the same tolerance."""
    variant = case.variant(lambda op, **kw: call(op, kw, backend), _copy(case, inputs))
    verdicts = {}
    for name, value in variant.items():
        # the budget of the direct call, centred on it instead of on the oracle
        budget = compare(got[name], oracle[name], emulated[name], dtype)
        v = compare(value, got[name], got[name], dtype)
        verdicts[name] = Verdict(not v.detail and v.err <= budget.tol, v.err, budget.tol, v.detail)
    verdict = combine(verdicts)
    return "" if verdict.ok else f"invariant '{case.invariant}' broken: {verdict.detail}"
