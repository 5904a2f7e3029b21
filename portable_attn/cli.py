"""`portable-attn info | check | bench`."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, registry
from .backend import OPS
from .platforms import Platform, machine_platforms

ENV_VARS = ("PORTABLE_ATTN_PLATFORM", "PORTABLE_ATTN_BACKEND", "PORTABLE_ATTN_STRICT", "PORTABLE_ATTN_INTERPRET",
            "PORTABLE_ATTN_CHECK")
DEVICE_OF = {Platform.CUDA: "cuda", Platform.ROCM: "cuda", Platform.XPU: "xpu"}


def default_device() -> str:
    return DEVICE_OF.get(machine_platforms()[0], "cpu")


def device_arg(name: str | None) -> str:
    """--device, or the accelerator if any; a device this machine lacks is an error that says so."""
    import torch

    device = name or default_device()
    kind = torch.device(device).type
    module = getattr(torch, kind, None)
    if kind != "cpu" and not (module is not None and hasattr(module, "is_available") and module.is_available()):
        raise ValueError(f"--device {device}: this machine has no {kind} device (torch.{kind}.is_available() is "
                         f"False); this needs a GPU")
    return device


def declared_support(backend, device: str) -> dict[str, dict[str, str | None]]:
    """op -> dtype -> None (supported) or the reason, from the backend's own checks on each op's first case."""
    from .conformance import cases, tensors
    from .ops import make_call

    table = {}
    for op in OPS:
        case = cases.catalogue(cases.SMOKE, [op])[0]
        raw = case.make(np.random.default_rng(0))
        table[op] = {}
        for dtype in ("float32", "float16", "bfloat16"):
            call = make_call(op, tensors.to_torch(raw, tensors.DTYPES[dtype], device))
            table[op][dtype] = registry.why_not(backend, call)
    return table


def cmd_info(args, console: Console) -> int:
    console.print(f"[bold]portable-attn {__version__}[/]")
    plats = machine_platforms()
    console.print(f"platforms on this machine: {', '.join(p.value for p in plats)}")
    for var in ENV_VARS:
        if os.environ.get(var):
            console.print(f"  {var}={os.environ[var]}")
    t = Table(title="backends")
    for col in ("backend", "available", "platforms", "default priority", "what", "does not take"):
        t.add_column(col)
    for name, b in registry.backends().items():
        reason = b.available()
        prio = ", ".join(f"{p.value}#{registry.DEFAULT_PRIORITY[p].index(name) + 1}"
                         for p in Platform if name in registry.DEFAULT_PRIORITY[p])
        t.add_row(name, "[green]yes[/]" if reason is None else f"[yellow]no: {reason}[/]",
                  ", ".join(sorted(p.value for p in b.platforms)), prio or "by name only", b.description,
                  b.limits or "-")
    console.print(t)
    device = default_device()
    m = Table(title=f"support on {device} (each backend's own checks; `portable-attn check` proves it)")
    m.add_column("op", no_wrap=True)
    usable = {n: b for n, b in registry.backends().items() if b.available() is None}
    for name in usable:
        m.add_column(name)
    support = {n: declared_support(b, device) for n, b in usable.items()}
    for op in OPS:
        row = []
        for name in usable:
            per = support[name][op]
            ok = [d for d, r in per.items() if r is None]
            row.append(f"[green]{', '.join(ok)}[/]" if ok else f"[yellow]{next(iter(per.values()))}[/]")
        m.add_row(op, *row)
    console.print(m)
    return 0


def cmd_check(args, console: Console) -> int:
    from .conformance import report, suite

    device = device_arg(args.device)
    names = args.backend or suite.available_backends()
    for n in names:
        registry.get(n)  # unknown names fail here, listing the valid ones
    jobs = suite.plan(names, args.tier, args.dtype, args.op)
    if not jobs:
        console.print("[red]nothing to run: no case matches[/]")
        return 2
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("conformance", total=len(jobs))
        meta = {"tier": args.tier, "backends": names, "device": device, "version": __version__}
        done = []

        def step(r):
            bar.update(task, advance=1, description=f"{r.backend} {r.op} {r.case} [{r.dtype}]")
            done.append(r)
            if args.json:  # kept current, so that a run stopped at a time limit leaves what it found
                pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(args.json).write_text(report.to_json(done, meta))
        results = suite.run(jobs, device, step)
    console.print(report.table(results))
    for path, text in ((args.json, lambda: report.to_json(results, meta)), (args.junit, lambda: report.to_junit(results)),
                       (args.markdown, lambda: report.markdown(results, registry.implementation_notes()))):
        if path:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(path).write_text(text())
    bad = report.failed(results)
    for r in bad:
        console.print(f"[red]FAIL[/] {r.backend} {r.op} {r.case} [{r.dtype}]: {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "unsupported")}
    console.print(f"{counts['pass']} passed, {counts['fail'] + counts['error']} failed, "
                  f"{counts['unsupported']} unsupported")
    return 1 if bad else 0


def cmd_bench(args, console: Console) -> int:
    from . import bench

    args.device = device_arg(args.device)
    return bench.command(args, console)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portable-attn", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="platform, backends and their availability, the per-op support matrix")
    c = sub.add_parser("check", help="run the conformance suite and print the table")
    c.add_argument("--backend", action="append", help="backend to check (repeatable; default: every available one)")
    c.add_argument("--tier", choices=("smoke", "full"), default="smoke")
    c.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16", "float64"))
    c.add_argument("--op", action="append", choices=OPS)
    c.add_argument("--device", help="torch device for the inputs (default: the accelerator if any, else cpu)")
    c.add_argument("--json", help="write the results as JSON here")
    c.add_argument("--junit", help="write JUnit XML here")
    c.add_argument("--markdown", help="write the Markdown support matrix here")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("bench", help="time backends and peer implementations side by side; write JSON and PNG plots")
    b.add_argument("--list", action="store_true", help="list the cases and their sizes, run nothing")
    b.add_argument("--case", action="extend", nargs="+", metavar="NAME", help="cases to run (default: all)")
    b.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                   help="portable_attn backends to time (default: every available one but reference)")
    b.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the peers (SDPA, FlexAttention, transformers' PyTorch paths)")
    b.add_argument("--repeat", type=int, default=5, help="timed calls per implementation (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    b.add_argument("--quick", action="store_true", help="tiny sizes (tests, CI)")
    b.add_argument("--device", help="torch device (default: the accelerator if any, else cpu)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json and the PNGs (default bench-results)")
    b.add_argument("--mem-budget-gb", type=float, default=16.0,
                   help="skip peers whose estimated peak exceeds this many GiB (default 16)")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each implementation's peak memory in a worker process")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    if args.command == "check" and args.dtype is None:
        args.dtype = ["float32", "float16", "bfloat16"]
    try:
        return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command](args, console)
    except ValueError as exc:  # a bad backend name or env var: say it, no traceback
        console.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
