"""`portable-attn bench`: portable_attn backends and the peers a user would pick instead, timed side by side.

cases.py   what is measured (op, pattern, sizes, visible FLOPs and bytes)
impls.py   an implementation under test; backends as implementations
peers.py   SDPA, FlexAttention, gather+SDPA, the transformers PyTorch paths
fla_peers.py   flash-linear-attention's Triton kernels (GPU) for the recurrent ops
plan.py    which implementations a case runs; rebuilding one in a worker process
timing.py  round-robin timing, medians; the worker for dense-mask peers
memory.py  peak memory per implementation, in a separate process
runner.py  one run -> a JSON-ready dict
report.py, plots.py   tables, JSON, PNGs
"""
from __future__ import annotations

import pathlib

from rich.console import Console
from rich.markup import escape

from portable_attn import registry

from . import cases, plan, plots, report, runner


def command(args, console: Console) -> int:
    """The CLI subcommand: `args` as `portable_attn.cli` parses them (device filled in)."""
    if args.list:
        console.print(report.case_list(cases.named(args.quick)))
        return 0
    for name in args.backend or ():
        registry.get(name)  # unknown names fail here, listing the valid ones
    if args.repeat < 1 or args.warmup < 0:
        raise ValueError("--repeat must be at least 1 and --warmup at least 0")
    settings = runner.Settings(
        cases=tuple(args.case or cases.catalogue(args.quick)),
        backends=tuple(args.backend or plan.default_backends(args.device)), peers=args.peers, repeat=args.repeat,
        warmup=args.warmup, quick=args.quick, device=args.device, mem_budget_gb=args.mem_budget_gb,
        memory=args.memory, threads=tuple(args.threads or plan.default_threads(args.device, args.quick)))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = runner.run(settings, log=lambda msg: console.print(f"[dim]{escape(msg)}[/]"),
                         checkpoint=lambda partial: report.write_json(partial, out))
    for table in report.tables(results):
        console.print(table)
    for line in (report.bandwidth_line(results), report.matmul_line(results)):
        if line:
            console.print(line)
    written = [report.write_json(results, out)]
    try:
        written += plots.write(results, out)
    except ImportError as exc:
        console.print(f"[yellow]no plots: {escape(str(exc))} (pip install 'portable-attn\\[bench]')[/]")
    console.print(f"{results['elapsed_s']:.0f} s; wrote {', '.join(str(p) for p in written)}", markup=False)
    errors = [f"{c['name']} {p['label']} {e['name']}" for c in results["cases"] for p in c["points"]
              for e in p["impls"] if e["status"] == "error"]
    for where in errors:
        console.print(f"[red]error[/] in {escape(where)}")
    return 1 if errors else 0
