"""Backend discovery (built-ins plus the ``portable_attn.backends`` entry-point group) and selection."""
from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points

from . import checkmemo, envs
from .backend import Backend, Call
from .errors import BackendUnavailable, NotSupported
from .platforms import Platform

log = logging.getLogger("portable_attn")

ENTRY_POINT_GROUP = "portable_attn.backends"

# Built-in backends: "module:attribute" of each Backend instance (declarations only, no kernels).
BUILTIN = {
    "reference": "portable_attn.backends.reference:BACKEND",
    "cpu": "portable_attn.backends.cpu:BACKEND",
    "triton": "portable_attn.backends.triton:BACKEND",
    "pallas": "portable_attn.backends.pallas:BACKEND",
    "onnxruntime": "portable_attn.backends.onnxruntime:BACKEND",
    "torch": "portable_attn.backends.torch:BACKEND",
    "ipex": "portable_attn.backends.ipex:BACKEND",  # opt-in: in no DEFAULT_PRIORITY
}

# Default priority per platform; names not registered (not built here) are passed over.
DEFAULT_PRIORITY = {
    Platform.CPU: ("cpu", "torch", "reference"),
    Platform.CUDA: ("triton", "reference"),
    Platform.ROCM: ("triton", "reference"),
    Platform.XPU: ("triton", "reference"),
    Platform.TPU: ("pallas",),
}


def _load(target: str) -> Backend:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def backends() -> dict[str, Backend]:
    """Every registered backend by name: built-ins first, then entry points (a name clash is an error)."""
    found = {name: _load(target) for name, target in BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            raise RuntimeError(f"entry point {ep.value!r} registers backend {ep.name!r}, which already exists")
        backend = ep.load()
        backend = backend() if isinstance(backend, type) else backend
        if not isinstance(backend, Backend) or backend.name != ep.name:
            raise RuntimeError(f"entry point {ep.name}={ep.value} must name a Backend called {ep.name!r}")
        found[ep.name] = backend
    return found


def rediscover() -> None:
    """Forget the backends found and the backend names parsed, so that the next call discovers them anew
    (after installing a plugin in a running process, or in tests that fake entry points)."""
    backends.cache_clear()
    _parse_names.cache_clear()
    checkmemo.forget()


def get(name: str) -> Backend:
    known = backends()
    if name not in known:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(sorted(known))}")
    return known[name]


def implementation_notes() -> dict:
    """{(backend, op): how it is implemented} where a backend says (`Backend.notes`), for the support matrix."""
    return {(name, op): note for name, b in backends().items() for op, note in b.notes.items()}


def _parse(spec, source: str) -> tuple:
    return _parse_names(spec if isinstance(spec, str) else tuple(spec), source)


@functools.lru_cache(maxsize=64)  # a call names its backends the same way every time
def _parse_names(spec, source: str) -> tuple:
    names = [spec] if isinstance(spec, str) else list(spec)
    names = tuple(n.strip() for item in names for n in item.split(",") if n.strip())
    if not names:
        raise ValueError(f"{source} names no backend")
    for name in names:
        if name not in backends():
            raise ValueError(f"{source}: unknown backend {name!r}; valid names: {', '.join(sorted(backends()))}")
    return names


def why_not(backend: Backend, call: Call) -> str | None:
    """The first reason `backend` cannot run `call`, or None."""
    return backend.available() or backend.serves(call.platform) or backend.supports(call)


@functools.cache
def _log_once(op: str, backend: str, reason: str) -> None:
    """A fallback is logged at WARNING (visible by default), once per (op, backend, reason)."""
    log.warning("portable_attn: %s skips backend %s: %s", op, backend, reason)


def _candidates(call: Call, backend) -> list:
    """The backend names `call` may run on, in priority order: `backend=` beats PORTABLE_ATTN_BACKEND beats
    the platform default."""
    if backend is not None:
        return _parse(backend, "backend=")
    if envs.PORTABLE_ATTN_BACKEND:
        return _parse(envs.PORTABLE_ATTN_BACKEND, "PORTABLE_ATTN_BACKEND")
    return [n for n in DEFAULT_PRIORITY[call.platform] if n in backends()]


def first_choice(call: Call, backend=None) -> str | None:
    """The name of the backend `call` would try first (None if there is none)."""
    names = _candidates(call, backend)
    return names[0] if names else None


def select(call: Call, backend=None) -> Backend:
    """The backend that runs `call`: `backend=` beats PORTABLE_ATTN_BACKEND beats the platform default."""
    names = _candidates(call, backend)
    if len(names) == 1:
        chosen = get(names[0])
        _raise_if_unusable(chosen, call)
        return chosen
    reasons = []
    for name in names:
        candidate = get(name)
        reason = why_not(candidate, call)
        if reason is None:
            return candidate
        if envs.PORTABLE_ATTN_STRICT:
            _raise_if_unusable(candidate, call)
        _log_once(call.op, name, reason)
        reasons.append(f"{name}: {reason}")
    raise NotSupported("/".join(names), call.op, "; ".join(reasons) or "no backend for this platform")


def _raise_if_unusable(backend: Backend, call: Call) -> None:
    reason = backend.available()
    if reason:
        raise BackendUnavailable(backend.name, reason)
    reason = backend.serves(call.platform) or backend.supports(call)
    if reason:
        raise NotSupported(backend.name, call.op, reason)
