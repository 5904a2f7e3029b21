"""An implementation under test: a portable_attn backend or a peer, prepared outside the timed region."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import portable_attn
from portable_attn.errors import BackendUnavailable, NotSupported


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str                                          # "backend" or "peer"
    what: str                                          # exactly what one timed call does
    prepare: Callable[[dict, dict], Callable[[], object]]  # (op arguments, sizes) -> the timed call
    need_bytes: Callable[[dict], float] | None = None  # estimated peak, checked against the memory budget
    in_child: bool = False                             # timed in a worker process (dense masks)


class Refused(Exception):
    """An implementation that does not run here, with the status and reason to report."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def backend(name: str, op: str) -> Impl:
    def prepare(args, sizes):
        return functools.partial(getattr(portable_attn, op), **args, backend=name)
    return Impl(name, "backend", f"portable_attn.{op}(..., backend={name!r}), checks and dispatch included", prepare)


def start(impl: Impl, args: dict, sizes: dict, sync: Callable[[], None]):
    """Prepare `impl` and make its first call (compiles, lazy imports): the timed call and the setup seconds."""
    t0 = time.perf_counter()
    fn = impl.prepare(args, sizes)
    fn()
    sync()
    return fn, time.perf_counter() - t0


def classify(exc: Exception, impl: Impl) -> tuple[str, str]:
    """(status, reason) for an exception out of `impl`: a failing peer is skipped, a failing backend is an error."""
    if isinstance(exc, NotSupported):
        return "unsupported", exc.reason
    if isinstance(exc, BackendUnavailable):
        return "unavailable", exc.reason
    if isinstance(exc, Refused):
        return exc.status, exc.reason
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ("skipped", f"failed here: {reason}") if impl.kind == "peer" else ("error", reason)
