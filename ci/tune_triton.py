#!/usr/bin/env python3
"""Time one benchmark case's triton call under variants of this platform's launch-table entry, to fill the
tables of backends/triton/tuning.py from measurements (one GPU run per vendor, not autotuning at run time).

    python ci/tune_triton.py --case gpu_gdr --table recurrent --vary block_v=32,64 --vary num_warps=4,8

Every combination of the --vary values runs (the entry as it is first); each is a fresh compile, then the
median of --repeat timed calls (cases marked graph: CUDA graph replays, per call). Prints a table and writes
--json as it goes, so a run stopped at a time limit keeps what it measured. --quick runs the case's tiny
sizes (the interpreter on a CPU: a check of this script, not a measurement). --profile first prints the
GPU time of each kernel of the entry as it is (torch.profiler): where the time goes, before tuning it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys

import torch

from portable_attn.backends.triton import tuning
from portable_attn.bench import cases, impls, timing
from portable_attn.platforms import platform_of

TABLES = {"attention": tuning.TABLES, "recurrent": tuning.RECURRENT}


def variants(base, vary: list[str]) -> list:
    """The base entry, then the entries of every combination of `field=v1,v2,...` values (each entry once)."""
    names, values = [], []
    for item in vary:
        name, _, vals = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(base)}:
            raise SystemExit(f"--vary {item}: {type(base).__name__} has no field {name!r}")
        names.append(name)
        values.append([int(v) for v in vals.split(",")])
    combos = itertools.product(*values) if names else ()
    entries = [base] + [dataclasses.replace(base, **dict(zip(names, combo))) for combo in combos]
    return list(dict.fromkeys(entries))


def start(case, args, sync):
    """The case's triton call, made once (compiles)."""
    return impls.start(impls.backend("triton", case.op), args, case.points[0].sizes, sync)[0]


def time_entry(case, args, sync, device: str, repeat: int) -> float:
    fn, calls = timing.per_call(start(case, args, sync), case.graph, device)
    return statistics.median(timing.timed(fn, sync, calls) for _ in range(repeat))


def profile(case, args, sync, calls: int = 3) -> None:
    """Device time per kernel over `calls` calls of the case's triton call (warmed first)."""
    fn = start(case, args, sync)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    rows = sorted(((e.key, e.self_device_time_total / calls) for e in prof.key_averages()), key=lambda r: -r[1])
    for name, us in rows:
        if us > 0:
            print(f"  {us:9.1f} us  {name[:90]}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True)
    ap.add_argument("--table", choices=TABLES, default="recurrent")
    ap.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true")
    opts = ap.parse_args(argv)
    case = cases.named(opts.quick)[opts.case]
    args = case.make(case.points[0].sizes, opts.device)
    table = TABLES[opts.table]
    key = "interpret" if tuning.INTERPRET else platform_of(next(iter(args.values())))
    base, sync = table[key], timing.synchronizer(opts.device)
    if opts.profile and not opts.device.startswith("cuda"):
        print("--profile reads CUDA kernel times: skipped off CUDA", flush=True)
    elif opts.profile:
        print(f"{opts.case}: device time per kernel and call", flush=True)
        profile(case, args, sync)
    rows = []
    try:
        for entry in variants(base, opts.vary):
            table[key] = entry
            try:
                row = dict(entry=dataclasses.asdict(entry), median_s=time_entry(case, args, sync, opts.device,
                                                                                opts.repeat))
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                row = dict(entry=dataclasses.asdict(entry), error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            changed = {k: v for k, v in row["entry"].items() if getattr(base, k) != v} or "as is"
            result = f"{row['median_s'] * 1e3:.4f} ms" if "median_s" in row else row["error"]
            print(f"{opts.case} {changed}: {result}", flush=True)
            if opts.json:
                with open(opts.json, "w") as f:
                    json.dump(dict(case=opts.case, sizes=case.points[0].sizes, device=opts.device, rows=rows), f,
                              indent=1, default=str)
    finally:
        table[key] = base
    return 0 if all("median_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
