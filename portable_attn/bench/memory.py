"""Peak memory of one call of each implementation, measured in a spawned process of its own.

The number is the peak of resident memory (CPU: the process's VmHWM; CUDA: torch's allocated bytes)
during one call, after a warm-up call, above the process's state with the case's inputs built: what
the implementation keeps (dense masks, layout copies, block masks) plus its workspace and output.
One-time process costs (imports, compiler start-up) are left out by running each implementation once at
the quick sizes first. On CPU, glibc is told to return every freed block over 64 KiB to the system at
once, so memory one measurement freed is not reused silently by the next.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import multiprocessing

import torch

from . import impls, plan
from .timing import synchronizer

MEANING = ("peak memory during one warm call above the state with the inputs built (held masks and copies + "
           "workspace + output), measured in a separate process")


class _Rss:
    def __init__(self):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed blocks leave the RSS
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def current(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)

    def peak(self) -> int:
        return self._status("VmHWM")


class _Cuda:
    current = staticmethod(torch.cuda.memory_allocated)
    reset_peak = staticmethod(torch.cuda.reset_peak_memory_stats)
    peak = staticmethod(torch.cuda.max_memory_allocated)


def measure(specs: list[plan.Spec]) -> dict[plan.Spec, int | str]:
    """Bytes per spec, or the reason there is no number; one worker serves them in turn (a new one if it dies)."""
    results, ctx, worker = {}, multiprocessing.get_context("spawn"), None
    for spec in specs:
        if worker is None:
            conn, theirs = ctx.Pipe()
            worker = ctx.Process(target=_worker, args=(theirs, spec.device), daemon=True)
            worker.start()
            theirs.close()
        conn.send(spec)
        try:
            results[spec] = conn.recv()
        except EOFError:
            worker.join()
            results[spec] = f"memory worker died (exit code {worker.exitcode})"
            worker = None
    if worker is not None:
        conn.send(None)
        worker.join()
    return results


def _worker(conn, device: str) -> None:
    probe, warmed = (_Cuda() if device.startswith("cuda") else _Rss()), set()
    while (spec := conn.recv()) is not None:
        try:
            conn.send(_one(spec, probe, warmed))
        except Exception as exc:  # noqa: BLE001 - reported as the missing number's reason
            conn.send(f"{type(exc).__name__}: {exc}")


def _one(spec: plan.Spec, probe, warmed: set) -> int:
    sync = synchronizer(spec.device)
    if (spec.case, spec.impl) not in warmed:
        _, point, args, impl = plan.materialize(dataclasses.replace(spec, point=0, quick=True))
        impls.start(impl, args, point.sizes, sync)
        warmed.add((spec.case, spec.impl))
    _, point, args, impl = plan.materialize(spec)
    gc.collect()
    base = probe.current()
    fn, _ = impls.start(impl, args, point.sizes, sync)
    gc.collect()
    probe.reset_peak()
    fn()
    sync()
    return probe.peak() - base
