"""`portable-attn info | check | bench | demo`."""
from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import sys
import time

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, envs, registry
from .optable import NAMES as OPS
from .platforms import Platform, machine_platforms, xpu_summary

DEVICE_OF = {Platform.CUDA: "cuda", Platform.ROCM: "cuda", Platform.XPU: "xpu"}
LOG_WIDTH = 10_000  # without a terminal, lines and tables are as wide as their content: never cut or wrapped

CHECK_RULES = """\
exit status:
  0  every backend checked ran at least one case and none failed (with --strict: and
     passed a case of every op and dtype checked that it declares supported)
  1  a case failed or crashed; or, with --strict, a backend passed no case of an op and
     dtype that its own checks declare supported (the support `portable-attn info`
     shows: every case was refused), or became unavailable mid-run
  2  nothing was checked: an unknown or unavailable --backend, a missing --device, no
     matching case, or a checked backend that ran no case (every one unsupported)

A plain `check` runs every backend available here and names those it skips, with the reason.
A backend named with --backend must be available, or the check stops before running anything.
Unsupported cases are never counted as passed. CI entries use --strict.
With --fuzz N the fuzzer's random inputs (N per op, run on each backend, each in a dtype
it draws) replace the case catalogue, under the same rules; they run on the CPU.
"""


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


def make_console() -> Console:
    """Rich's own sizing on a terminal; in a pipe or a CI log, a width no table or line reaches."""
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)


def declared_refusal(backend, case, dtype: str, device: str) -> str | None:
    """Why `backend`'s own checks refuse `case` in `dtype` (None: it declares it supported), on the case's inputs."""
    import torch

    from .conformance import runner, tensors
    from .dispatch import make_call

    raw = case.make(np.random.default_rng(runner.seed_of(case)))
    state_dtype = tensors.DTYPES[dtype] if case.state_in_act_dtype else torch.float32
    return registry.why_not(backend, make_call(case.op, tensors.to_torch(raw, tensors.DTYPES[dtype], device,
                                                                          state_dtype)))


def declared_support(backend, device: str) -> dict[str, dict[str, str | None]]:
    """op -> dtype -> None (supported) or the reason, from the backend's own checks on each op's first case."""
    from .conformance import cases

    return {op: {dtype: declared_refusal(backend, cases.catalogue(cases.SMOKE, [op])[0], dtype, device)
                 for dtype in ("float32", "float16", "bfloat16")} for op in OPS}


def cmd_info(args, console: Console) -> int:
    console.print(f"[bold]portable-attn {__version__}[/]")
    plats = machine_platforms()
    console.print(f"platforms on this machine: {', '.join(p.value for p in plats)}")
    if Platform.XPU in plats and (xpu := xpu_summary()):
        console.print(f"xpu: {escape(xpu)}")
    env = Table(title="environment variables")
    for col in ("variable", "value", "what"):
        env.add_column(col)
    for var in envs.VARS.values():
        value = envs.raw(var.name) if envs.is_set(var.name) else f"unset ({var.default or 'empty'})"
        env.add_row(var.name, escape(value), escape(var.doc))
    console.print(env)
    t = Table(title="backends")
    for col in ("backend", "available", "platforms", "default priority", "what", "does not take", "backward"):
        t.add_column(col)
    for name, b in registry.backends().items():
        reason = b.available()
        prio = ", ".join(f"{p.value}#{registry.DEFAULT_PRIORITY[p].index(name) + 1}"
                         for p in Platform if name in registry.DEFAULT_PRIORITY[p])
        t.add_row(escape(name), "[green]yes[/]" if reason is None else f"[yellow]no: {escape(reason)}[/]",
                  ", ".join(sorted(p.value for p in b.platforms)), prio or "by name only", escape(b.description),
                  escape(b.limits or "-"), ", ".join(sorted(b.backward)) or "none: inference only")
    console.print(t)
    for name, b in registry.backends().items():
        if b.available() is None and b.settings():
            console.print(f"{escape(name)}: {escape(b.settings())}")
    device = default_device()
    m = Table(title=f"support on {device} (each backend's own checks; `portable-attn check` proves it)")
    m.add_column("op", no_wrap=True)
    usable = {n: b for n, b in registry.backends().items() if b.available() is None}
    for name in usable:
        m.add_column(escape(name))
    support = {n: declared_support(b, device) for n, b in usable.items()}
    for op in OPS:
        row = []
        for name in usable:
            per = support[name][op]
            ok = [d for d, r in per.items() if r is None]
            row.append(f"[green]{', '.join(ok)}[/]" if ok else f"[yellow]{escape(next(iter(per.values())))}[/]")
        m.add_row(op, *row)
    console.print(m)
    return 0


def checked_backends(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(backends to check, {backend skipped: why}): the named ones, or every registered one available here."""
    for name in requested or ():
        registry.get(name)  # unknown names fail here, listing the valid ones
    candidates = list(dict.fromkeys(requested)) if requested else list(registry.backends())
    why = {name: registry.get(name).available() for name in candidates}
    return [n for n in candidates if why[n] is None], {n: r for n, r in why.items() if r is not None}


class OpLines:
    """Progress for a log: a line per (backend, op) when its `totals` are in (or its op is over: the fuzzer
    may draw fewer), with its counts and the time so far."""

    def __init__(self, console: Console, totals: dict[tuple[str, str], int]):
        self.console, self.totals, self.start = console, totals, time.perf_counter()
        self.counts: dict[tuple[str, str], collections.Counter] = {}
        self.done = 0

    def step(self, r) -> None:
        for key in [k for k in self.counts if k[1] != r.op]:
            self.line(key)
        key = (r.backend, r.op)
        self.counts.setdefault(key, collections.Counter())[r.status] += 1
        self.done += 1
        if self.counts[key].total() >= self.totals.get(key, 0):
            self.line(key)

    def line(self, key: tuple[str, str]) -> None:
        c = self.counts.pop(key)
        self.console.print(f"{key[0]} {key[1]}: {c.total()} cases, {c['pass']} passed, "
                           f"{c['fail'] + c['error']} failed, {c['unsupported']} unsupported "
                           f"({self.done}/{sum(self.totals.values())} done, {time.perf_counter() - self.start:.0f} s)",
                           markup=False)

    def flush(self) -> None:
        for key in list(self.counts):
            self.line(key)


@contextlib.contextmanager
def progress(console: Console, quiet: bool, totals: dict[tuple[str, str], int]):
    """Yields step(result): nothing when quiet, a live bar on a terminal, `OpLines` in a log."""
    if quiet:
        yield lambda r: None
    elif console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("conformance", total=sum(totals.values()))
            yield lambda r: bar.update(task, advance=1, description=escape(f"{r.backend} {r.op} {r.case} [{r.dtype}]"))
    else:
        lines = OpLines(console, totals)
        yield lines.step
        lines.flush()


def strict_problems(results, device: str) -> list[str]:
    """What --strict rejects: a backend unavailable mid-run, and an (op, dtype) that the backend's own checks
    declare supported (as `info` shows them) where it passed no case, every one refused."""
    from .conformance import cases

    found = [f"{r.backend} {r.op} {r.case} [{r.dtype}]: became {r.detail}" for r in results
             if r.status == "unsupported" and r.detail.startswith("unavailable:")]
    groups = collections.defaultdict(list)
    for r in results:
        groups[(r.backend, r.op, r.dtype)].append(r)
    for (backend, op, dtype), group in groups.items():
        if all(r.status == "unsupported" for r in group):
            first = cases.catalogue(cases.SMOKE, [op])[0]
            if declared_refusal(registry.get(backend), first, dtype, device) is None:
                found.append(f"{backend} {op} [{dtype}]: declared supported, yet no case ran "
                             f"({len(group)} unsupported: {group[0].detail})")
    return found


def fuzz_options(args) -> str | None:
    """What is wrong with the combination of --fuzz, --seed, --tier and --dtype, if anything."""
    if args.fuzz is None:
        return "--seed is for --fuzz" if args.seed is not None else None
    if args.fuzz < 1:
        return f"--fuzz: expected at least 1 example, got {args.fuzz}"
    if args.tier is not None or args.dtype is not None:
        return "--fuzz replaces the catalogue: --tier and --dtype do not apply (the fuzzer draws dtypes)"
    return None


def run_checks(args, names: list[str], device: str, console: Console, meta: dict):
    """The catalogue's (or the fuzzer's) results, reported as they come; None when no case matches."""
    from .conformance import report, suite

    if args.fuzz:
        totals = {(b, op): args.fuzz for b in names for op in args.op or OPS}
    else:
        jobs = suite.plan(names, args.tier, args.dtype, args.op)
        if not jobs:
            return None
        # each backend's ops one after the other (a stable sort: the catalogue's order within an op)
        jobs.sort(key=lambda job: (names.index(job[0]), OPS.index(job[1].op)))
        totals = collections.Counter((b, case.op) for b, case, _ in jobs)
    done = []
    with progress(console, args.quiet, totals) as show:
        def step(r):
            show(r)
            done.append(r)
            if args.json:  # kept current, so that a run stopped at a time limit leaves what it found
                pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(args.json).write_text(report.to_json(done, meta))
        if args.fuzz:
            from .conformance.fuzz import run_fuzz  # hypothesis is imported only for --fuzz

            return run_fuzz(names, args.fuzz, seed=args.seed, ops=args.op, progress=step)
        return suite.run(jobs, device, step)


def cmd_check(args, console: Console) -> int:
    from .conformance import report

    if problem := fuzz_options(args):
        raise ValueError(problem)
    if not args.fuzz:
        args.tier, args.dtype = args.tier or "smoke", args.dtype or ["float32", "float16", "bfloat16"]
    device = device_arg(args.device)
    if args.fuzz and device != "cpu":
        raise ValueError(f"--fuzz runs its inputs on the CPU (the fuzzer takes no device): got --device {device}; "
                         f"pass --device cpu")
    names, skipped = checked_backends(args.backend)
    for name, reason in skipped.items():
        console.print(f"[yellow]skipped {escape(name)}[/]: unavailable here: {escape(reason)}")
    if args.backend and skipped:
        console.print(f"[red]error:[/] --backend {escape(', '.join(skipped))}: unavailable here; nothing checked")
        return 2
    what = f"{args.fuzz} fuzzed examples per op" if args.fuzz else f"tier {args.tier}, {', '.join(args.dtype)}"
    console.print(f"checking {escape(', '.join(names)) or 'nothing'} on {device}: {what}"
                  f"{', strict' if args.strict else ''}")
    meta = {"tier": args.tier, "fuzz": args.fuzz, "seed": args.seed, "backends": names,
            "skipped": skipped, "strict": args.strict, "device": device, "version": __version__}
    results = run_checks(args, names, device, console, meta) if names else None
    if not results:
        console.print("[red]nothing checked:[/] " + ("no case matches" if names else "no backend is available here"))
        return 2
    console.print(report.table(results))
    for path, text in ((args.json, lambda: report.to_json(results, meta)), (args.junit, lambda: report.to_junit(results)),
                       (args.markdown, lambda: report.markdown(results, registry.implementation_notes()))):
        if path:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(path).write_text(text())
    return verdict(args, results, names, skipped, device, console)


def verdict(args, results, names: list[str], skipped: dict[str, str], device: str, console: Console) -> int:
    """Print the failures, the refusals --strict rejects, idle backends and the counts; the exit status."""
    from .conformance import report

    bad = report.failed(results)
    for r in bad:
        console.print(f"[red]FAIL[/] {escape(f'{r.backend} {r.op} {r.case} [{r.dtype}]: {r.detail}')}")
    refused = strict_problems(results, device) if args.strict else []
    for problem in refused:
        console.print(f"[red]STRICT[/] {escape(problem)}")
    ran = {r.backend for r in results if r.status != "unsupported"}
    idle = [n for n in names if n not in ran] if args.backend else ([] if ran else names)
    for name in idle:
        console.print(f"[red]nothing checked:[/] {escape(name)} ran no case (every one unsupported)")
    counts = collections.Counter(r.status for r in results)
    line = (f"{counts['pass']} passed, {counts['fail'] + counts['error']} failed, {counts['unsupported']} unsupported"
            f"{f' ({len(refused)} not accepted by --strict)' if args.strict else ''}")
    if skipped:
        line += f"; skipped (unavailable here): {', '.join(skipped)}"
    console.print(line, markup=False)
    return 1 if bad or refused else 2 if idle else 0


def cmd_bench(args, console: Console) -> int:
    from . import bench

    args.device = device_arg(args.device)
    return bench.command(args, console)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portable-attn", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="platform, backends and their availability, the per-op support matrix")
    c = sub.add_parser("check", help="run the conformance suite and print the table", epilog=CHECK_RULES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--backend", action="append",
                   help="backend to check (repeatable; default: every available one); it must be available here")
    c.add_argument("--tier", choices=("smoke", "full"), help="case catalogue tier (default smoke)")
    c.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16", "float64"),
                   help="repeatable; default float32, float16 and bfloat16")
    c.add_argument("--op", action="append", choices=OPS)
    c.add_argument("--strict", action="store_true",
                   help="also fail when a backend runs no case of an op and dtype it declares supported (CI)")
    c.add_argument("--fuzz", type=int, metavar="N",
                   help="N random examples per op and backend from the fuzzer, instead of the catalogue")
    c.add_argument("--seed", type=int, help="the fuzzer's seed (--fuzz only; default: the fuzzer's own)")
    c.add_argument("--device", help="torch device for the inputs (default: the accelerator if any, else cpu)")
    c.add_argument("--json", help="write the results as JSON here")
    c.add_argument("--junit", help="write JUnit XML here")
    c.add_argument("--markdown", help="write the Markdown support matrix here")
    c.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, one line per op in a log)")
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
    b.add_argument("--threads", type=int, nargs="+", metavar="N",
                   help="torch thread counts to time every point at (default on CPU: 1 2; --quick and GPUs: "
                        "torch's current count)")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each implementation's peak memory in a worker process")
    sub.add_parser("demo", help="a small hybrid transformers model (random weights) through portable_attn, beside "
                                "transformers' own path (needs transformers; `demo --help` lists its options)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from .integrations import demo

        return demo.main(argv[1:])
    args = parser().parse_args(argv)
    console = make_console()
    try:
        return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command](args, console)
    except (ValueError, ImportError) as exc:  # a bad backend name or env var, a missing extra: say it, no traceback
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
