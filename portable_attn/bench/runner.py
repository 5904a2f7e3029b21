"""One benchmark run: each point of each case timed across its implementations, then peak memory, ratios."""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import os
import platform
import time
from typing import Callable

import torch

from portable_attn import __version__

from . import cases, host, impls, memory, plan, timing

NOTES = {
    "times_s": "seconds per call after `warmup` rounds; every implementation is called once per round, round-robin, "
               "in this process (sdpa-mask in a worker process, still one call per turn)",
    "setup_s": "prepare + first call: layout copies, masks, block masks, compiles, lazy imports",
    "gflops": "FLOPs of the visible work (portable_attn/bench/cases.py) / median",
    "gbps": "bytes a memory-bound call must move once (decode: K, V, q, out, block table; steps: inputs, outputs, "
            "the state read and written back) / median",
    "bw_frac": "gbps / the bandwidth of a device-to-device copy measured in the same run (`bandwidth`)",
    "graph": "cases marked graph (GPU steps) time replays of a CUDA graph of 10 calls on CUDA, per call: the launch "
             "gaps of an engine running decode, not Python's",
    "ratio": "baseline median / this median (> 1: faster than the case's baseline)",
    "peak_mem_bytes": memory.MEANING,
    "threads": "torch.set_num_threads for the point's calls (peers included); each thread count is its own "
               "round-robin, so ratios compare implementations at one thread count",
    "scaling": "this implementation's median at the point's lowest thread count / its median here",
    "matmul": "GFLOP/s of a square matrix product per dtype and thread count, measured in the same run: what the "
              "cores' float32 and bfloat16 units reach through torch",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    cases: tuple[str, ...]
    backends: tuple[str, ...]
    peers: bool = True
    repeat: int = 5
    warmup: int = 1
    quick: bool = False
    device: str = "cpu"
    mem_budget_gb: float = 16.0
    memory: bool = True
    threads: tuple[int, ...] = ()  # torch thread counts each point runs at (empty: torch's current one)


def machine(device: str) -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers, portable_attn=__version__, python=platform.python_version(),
                platform=platform.platform(), device=device,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(settings: Settings, log: Callable[[str], None] = print,
        checkpoint: Callable[[dict], None] = lambda results: None) -> dict:
    """All cases of `settings`; `checkpoint` gets the results so far after each case (a run stopped by a time
    limit keeps what it finished)."""
    t0, info = time.perf_counter(), machine(settings.device)
    catalogue = cases.named(settings.quick)
    unknown = [n for n in settings.cases if n not in catalogue]
    if unknown:
        raise ValueError(f"unknown case {', '.join(unknown)}; valid names: {', '.join(catalogue)}")
    bandwidth, threads = None, settings.threads or (torch.get_num_threads(),)
    if any(catalogue[n].bytes for n in settings.cases) or settings.device == "cpu":
        log("memory bandwidth: a device-to-device copy")
        bandwidth = timing.copy_bandwidth(settings.device, *_copy_size(settings))
    if settings.device == "cpu":
        log("matrix-product rates, fp32 and bf16")
        info["matmul"] = timing.matmul_rates(threads, settings.quick)
    results = []
    for number, name in enumerate(settings.cases, 1):
        case = catalogue[name]
        log(f"case {number}/{len(settings.cases)}: {name} ({time.perf_counter() - t0:.0f} s so far)")
        if name == host.NAME:  # its own rows: each op beside the kernel it ends in, checks on and off
            results.append(host.run(case, settings, log))
            checkpoint(_results(info, settings, bandwidth, t0, results))
            continue
        points = []
        for index, point in enumerate(case.points):
            for n in threads:
                log(f"{case.name} {case.label(point)}, {n} thread{'s' * (n > 1)}")
                with timing.threads(n):
                    points.append(_run_point(case, index, point, settings, bandwidth) | dict(threads=n))
                log(f"  {', '.join(_progress(e) for e in points[-1]['impls'])} ({time.perf_counter() - t0:.0f} s)")
            _add_scaling(points[-len(threads):])
        results.append(dict(name=case.name, op=case.op, pattern=case.pattern, axis=case.axis,
                            baseline=case.baseline, points=points))
        checkpoint(_results(info, settings, bandwidth, t0, results))
    if settings.memory:
        log("peak memory, one worker process")
        _add_memory(results, settings)
    return _results(info, settings, bandwidth, t0, results)


def _progress(entry: dict) -> str:
    setup = f" (setup {entry['setup_s']:.1f} s)" if "setup_s" in entry else ""
    return f"{entry['name']} {entry['status']}{setup}"


def _results(info, settings, bandwidth, t0, results) -> dict:
    return dict(machine=info, settings=dataclasses.asdict(settings), notes=NOTES, bandwidth=bandwidth,
                elapsed_s=time.perf_counter() - t0, cases=results)


def _copy_size(settings: Settings) -> tuple[int, int]:
    """(bytes copied, repetitions): far above the last-level cache, yet quick."""
    if settings.quick:
        return 16 * 2**20, 3
    return (2**30, 20) if settings.device.startswith("cuda") else (256 * 2**20, 5)


def _run_point(case: cases.Case, index: int, point: cases.Point, settings: Settings, bandwidth: dict | None) -> dict:
    sync = timing.synchronizer(settings.device)
    args = case.make(point.sizes, settings.device)
    todo = plan.impls_for(case, settings.backends, settings.peers)
    entries = {i.name: dict(name=i.name, kind=i.kind, what=i.what, status="ok", reason=None) for i in todo}
    runners = {}
    for impl in todo:
        entry = entries[impl.name]
        need = impl.need_bytes(point.sizes) if impl.need_bytes else None
        if need is not None and need > settings.mem_budget_gb * 2**30:
            entry.update(status="skipped",
                         reason=f"needs ≈{need / 1e9:.1f} GB, over the {settings.mem_budget_gb:g} GiB memory budget")
            continue
        try:
            if impl.in_child:
                spec = plan.Spec(case.name, index, impl.name, settings.quick, settings.device)
                runner = timing.ChildRunner(spec, torch.get_num_threads())
                entry["setup_s"] = runner.setup_s
            else:
                fn, entry["setup_s"] = impls.start(impl, args, point.sizes, sync)
                fn, calls = timing.per_call(fn, case.graph, settings.device)
                runner = functools.partial(timing.timed, fn, sync, calls)
        except Exception as exc:  # noqa: BLE001 - reported as the implementation's status
            entry["status"], entry["reason"] = impls.classify(exc, impl)
            continue
        runners[impl.name] = runner
    try:
        times, failed = timing.round_robin(runners, settings.warmup, settings.repeat)
    finally:
        for runner in runners.values():
            if isinstance(runner, timing.ChildRunner):
                runner.close()
    by_name = {i.name: i for i in todo}
    for name, exc in failed.items():
        entries[name]["status"], entries[name]["reason"] = impls.classify(exc, by_name[name])
    flops, nbytes = case.flops(point.sizes), case.bytes(point.sizes) if case.bytes else None
    for name in runners.keys() - failed.keys():
        entry = entries[name]
        entry.update(timing.summary(times[name]))
        entry["gflops"] = flops / entry["median_s"] / 1e9
        entry["gbps"] = nbytes / entry["median_s"] / 1e9 if nbytes else None
        entry["bw_frac"] = entry["gbps"] / bandwidth["gbps"] if nbytes and bandwidth else None
    base = entries.get(case.baseline)
    for entry in entries.values():
        ok = entry["status"] == "ok" and base is not None and base["status"] == "ok"
        entry["ratio"] = base["median_s"] / entry["median_s"] if ok else None
    return dict(label=case.label(point), x=point.x, sizes=point.sizes, flops=flops, bytes=nbytes,
                impls=list(entries.values()))


def _add_scaling(runs: list[dict]) -> None:
    """Each entry's speed-up over the same implementation at the lowest thread count of its point."""
    first = {e["name"]: e.get("median_s") for e in runs[0]["impls"]}
    for run in runs:
        for e in run["impls"]:
            one = first.get(e["name"])
            e["scaling"] = one / e["median_s"] if one and e.get("median_s") else None


def _add_memory(results: list[dict], settings: Settings) -> None:
    where = {}  # one measurement per (case, point, implementation), whatever the thread count
    for case in results:
        index = {}
        for point in case["points"]:
            i = index.setdefault(point["x"], len(index))
            for entry in point["impls"]:
                if entry["status"] == "ok":
                    spec = plan.Spec(case["name"], i, entry["name"], settings.quick, settings.device)
                    where.setdefault(spec, []).append(entry)
    for spec, value in memory.measure(list(where)).items():
        for entry in where[spec]:
            entry["peak_mem_bytes"] = value if isinstance(value, int) else None
            entry["peak_mem_note"] = None if isinstance(value, int) else value
