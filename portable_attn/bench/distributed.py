"""Context-parallel attention on gloo ranks of this machine: key/value bytes each rank receives and its time per
call, beside the same attention on one process, for 2 and 4 ranks.

    python -m portable_attn.bench.distributed [--tokens 8192] [--worlds 2 4] [--repeat 5] [--json F]

Every rank runs one thread (the ranks share the machine's cores, so compare ranks' times with the one-process
row, also one thread, not with a GPU cluster; the scaling model in BENCHMARKS.md is for that). Bytes come from
the exchange plan the op runs (`portable_attn.distributed.plan`); times are medians over `repeat` calls after
one warm-up, the slowest rank's median reported.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import portable_attn as pa
from portable_attn.distributed import ContextLayout, context_attention, plan, received_tokens
from portable_attn.distributed.ranks import run_ranks

HQ, HKV, D = 8, 2, 64
SCENARIOS = {"causal": dict(causal=True), "window 256": dict(causal=True, window_size=(255, 0))}


def _inputs(tokens: int, dtype):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tokens, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))


def _median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank, world, tokens, repeat, dtype_name, out_dir):
    dtype = getattr(torch, dtype_name)
    q, k, v = _inputs(tokens, dtype)
    layout = ContextLayout([0, tokens], world)
    local = [layout.shard(x, rank) for x in (q, k, v)]
    result = {}
    for name, opts in SCENARIOS.items():
        dist.barrier()
        result[name] = _median_time(lambda: context_attention(*local, layout, **opts), repeat)
    pathlib.Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def measure(tokens: int, worlds, repeat: int, dtype_name: str) -> list[dict]:
    rows = []
    torch.set_num_threads(1)
    q, k, v = _inputs(tokens, getattr(torch, dtype_name))
    item = q.element_size()
    for name, opts in SCENARIOS.items():
        one = _median_time(lambda: pa.attention(q, k, v, **opts), repeat)
        rows.append(dict(scenario=name, dtype=dtype_name, ranks=1, seconds=one, recv_bytes=0, total_kv_bytes=0))
        for world in worlds:
            layout = ContextLayout([0, tokens], world)
            got = received_tokens(layout, plan(layout, causal=True, window_size=opts.get("window_size", (-1, -1))))
            per_token = HKV * 2 * D * item
            rows.append(dict(scenario=name, dtype=dtype_name, ranks=world, seconds=None,
                             recv_bytes=max(got) * per_token, total_kv_bytes=tokens * per_token))
    for world in worlds:
        with tempfile.TemporaryDirectory() as out_dir:
            run_ranks(_rank, world, tokens, repeat, dtype_name, out_dir, timeout=600)
            per_rank = [json.loads(pathlib.Path(out_dir, f"{r}.json").read_text()) for r in range(world)]
        for row in rows:
            if row["ranks"] == world:
                row["seconds"] = max(p[row["scenario"]] for p in per_rank)
    return rows


def table(rows: list[dict], tokens: int) -> Table:
    t = Table(title=f"context-parallel attention, one sequence of {tokens} tokens, Hq={HQ} Hkv={HKV} D={D}, "
                    "cpu backend, 1 thread per rank")
    for col in ("scenario", "dtype", "ranks", "s per call (slowest rank)", "vs 1 process", "KV bytes received "
                "(max rank)", "of all KV"):
        t.add_column(col, justify="left" if col in ("scenario", "dtype") else "right", no_wrap=True)
    base = {(r["scenario"], r["dtype"]): r["seconds"] for r in rows if r["ranks"] == 1}
    for r in rows:
        share = f"{r['recv_bytes'] / r['total_kv_bytes']:.1%}" if r["total_kv_bytes"] else "-"
        t.add_row(r["scenario"], r["dtype"], str(r["ranks"]), f"{r['seconds']:.4f}",
                  f"{base[(r['scenario'], r['dtype'])] / r['seconds']:.2f}x", f"{r['recv_bytes']:,}", share)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--json", type=pathlib.Path)
    args = p.parse_args(argv)
    rows = [r for d in args.dtypes for r in measure(args.tokens, args.worlds, args.repeat, d)]
    Console(width=200).print(table(rows, args.tokens))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
