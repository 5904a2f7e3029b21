"""Interleaved timing: each repetition calls every implementation once, round-robin, after warm-up rounds."""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import time
from typing import Callable

import numpy as np
import torch

from . import impls, plan


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None], calls: int = 1, clock=time.perf_counter) -> float:
    """Seconds per call of `fn`, which makes `calls` calls (a CUDA graph replay), on `clock`."""
    sync()
    t0 = clock()
    fn()
    sync()
    return (clock() - t0) / calls


GRAPH_CALLS = 10  # calls captured in one CUDA graph: the launch gaps between them are the engine's, not Python's


def cuda_graph(fn: Callable[[], object], calls: int = GRAPH_CALLS) -> Callable[[], object]:
    """`calls` calls of `fn` captured in one CUDA graph (warmed on a side stream first); its replay."""
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        fn()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def per_call(fn: Callable[[], object], graph: bool, device: str) -> tuple[Callable[[], object], int]:
    """(timed callable, calls it makes): a case marked graph is timed as replays of a CUDA graph on CUDA."""
    if graph and device.startswith("cuda"):
        return cuda_graph(fn), GRAPH_CALLS
    return fn, 1


def copy_bandwidth(device: str, nbytes: int, repeat: int) -> dict:
    """The memory bandwidth a large device-to-device copy reaches here (bytes read + written / median)."""
    sync = synchronizer(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    copy()
    times = [timed(copy, sync) for _ in range(repeat)]
    median = float(np.median(times))
    return dict(bytes=2 * nbytes, median_s=median, gbps=2 * nbytes / median / 1e9, repeat=repeat)


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_S = 0.2  # the longest matrix product the rate probe times (five per dtype and thread count)


def matmul_rates(counts, quick: bool = False) -> dict:
    """GFLOP/s of an n x n matrix product per dtype and thread count (median of 5):
    {"size": {"fp32": n, "bf16": n}, "gflops": {"fp32": {"1": .., "2": ..}, "bf16": {..}}}. n is 2048 (256
    quick) or less where a 256 product predicts more than MATMUL_S per call: bf16 products without the vector
    instructions for them run at a few GFLOP/s (AVX2 hosts), where 2048 would take half a minute a call."""
    rates, sizes = {}, {}
    for name, dtype in MATMUL_DTYPES.items():
        n = 256 if quick else _matmul_size(dtype)
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for count in counts:
            with threads(count):
                a @ b
                median = float(np.median([timed(functools.partial(torch.mm, a, b), lambda: None) for _ in range(5)]))
            rates.setdefault(name, {})[str(count)] = 2 * n**3 / median / 1e9
        sizes[name] = n
    return dict(size=sizes, gflops=rates)


def _matmul_size(dtype: torch.dtype) -> int:
    """The largest power of two up to 2048 (at least 256) whose product a 256 one predicts within MATMUL_S."""
    small = torch.randn(256, 256).to(dtype)
    small @ small
    per_cube = min(timed(functools.partial(torch.mm, small, small), lambda: None) for _ in range(3)) / 256**3
    return max(256, min(2048, 1 << int(math.log2((MATMUL_S / per_cube) ** (1 / 3)))))


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

    def __init__(self, spec: plan.Spec, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(theirs, spec, threads), daemon=True)
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


def _worker(conn, spec: plan.Spec, threads: int) -> None:
    torch.set_num_threads(threads)
    _, point, args, impl = plan.materialize(spec)
    sync = synchronizer(spec.device)
    try:
        fn, setup_s = impls.start(impl, args, point.sizes, sync)
        conn.send(("ok", setup_s))
        while conn.recv() == "run":
            conn.send(("ok", timed(fn, sync)))
    except Exception as exc:  # noqa: BLE001 - sent back as the implementation's status
        conn.send(("refused", *impls.classify(exc, impl)))
