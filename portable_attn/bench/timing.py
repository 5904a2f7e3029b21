"""Interleaved timing: each repetition calls every implementation once, round-robin, after warm-up rounds."""
from __future__ import annotations

import multiprocessing
import time
from typing import Callable

import numpy as np
import torch

from . import impls, plan


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def round_robin(runners: dict[str, Callable[[], float]], warmup: int, repeat: int):
    """Seconds per call of each runner (`repeat` of them), the starting runner rotating each round.
    A runner that raises leaves the rotation: (times, {name: exception})."""
    live, times, failed = list(runners), {n: [] for n in runners}, {}
    for rep in range(warmup + repeat):
        shift = rep % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            try:
                seconds = runners[name]()
            except Exception as exc:  # noqa: BLE001 - reported per implementation
                failed[name] = exc
                live.remove(name)
                continue
            if rep >= warmup:
                times[name].append(seconds)
    return times, failed


def summary(times: list[float]) -> dict:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return dict(times_s=times, median_s=float(median), min_s=float(min(times)), iqr_s=float(q3 - q1))


class ChildRunner:
    """One implementation timed in a spawned worker, one call per request (so it still takes its turn in
    the round-robin): its memory (a dense [T, T] mask) never lands in this process, and a crash there
    costs only this implementation."""

    def __init__(self, spec: plan.Spec):
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(theirs, spec), daemon=True)
        self.proc.start()
        theirs.close()
        self.setup_s = self._reply()

    def _reply(self) -> float:
        try:
            status, *rest = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"worker process died (exit code {self.proc.exitcode})") from None
        if status != "ok":
            self.close()
            raise impls.Refused(*rest)
        return rest[0]

    def __call__(self) -> float:
        self.conn.send("run")
        return self._reply()

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:  # the worker is gone already
            pass
        self.proc.join()
        self.conn.close()


def _worker(conn, spec: plan.Spec) -> None:
    _, point, args, impl = plan.materialize(spec)
    sync = synchronizer(spec.device)
    try:
        fn, setup_s = impls.start(impl, args, point.sizes, sync)
        conn.send(("ok", setup_s))
        while conn.recv() == "run":
            conn.send(("ok", timed(fn, sync)))
    except Exception as exc:  # noqa: BLE001 - sent back as the implementation's status
        conn.send(("refused", *impls.classify(exc, impl)))
