"""Run the catalogue over backends and dtypes."""
from __future__ import annotations

from typing import Callable, Iterable

from .. import registry
from .cases import SMOKE, Case, catalogue
from .runner import Result, run_case

DEFAULT_DTYPES = ("float32", "float16", "bfloat16")


def plan(backends: Iterable[str], tier: str = SMOKE, dtypes=DEFAULT_DTYPES, ops=None) -> list[tuple[str, Case, str]]:
    return [(b, c, d) for b in backends for c in catalogue(tier, ops) for d in dtypes]


def available_backends() -> list[str]:
    """Every registered backend usable on this machine (interpret modes included when enabled)."""
    return [name for name, b in registry.backends().items() if b.available() is None]


def run(jobs: list[tuple[str, Case, str]], device: str = "cpu",
        progress: Callable[[Result], None] | None = None) -> list[Result]:
    results = []
    for backend, case, dtype in jobs:
        res = run_case(backend, case, dtype, device)
        registry.get(backend).release()  # the suite runs hundreds of shapes no program would mix
        results.append(res)
        if progress:
            progress(res)
    return results
