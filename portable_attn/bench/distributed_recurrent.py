"""Sequence-parallel recurrent prefill: time per rank and bytes each rank sends, at several world sizes.

`run()` spawns `world` gloo ranks on this machine (loopback, one thread each) for every world size;
every rank builds the same global batch, takes its part (`split_packed`) and, repetition after
repetition, times the sequence-parallel op, interleaved with rank 0 timing the single-device op on
the whole batch (the peer) while the other ranks wait. `python -m portable_attn.bench.distributed_recurrent`
prints the table. Ranks beyond the machine's cores share them: say so with the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import portable_attn as pa
from portable_attn.distributed import recurrent, split_packed

H, K, V, P, N, G = 4, 64, 64, 64, 64, 1
OPS = ("gla", "gated_delta_rule", "ssd")


def _inputs(op: str, T: int, dtype: torch.dtype) -> tuple[str, tuple, dict]:
    """(op name, the arguments over tokens, all arguments): the whole batch, seeded."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if op == "gla":
        return "linear_attention", ("q", "k", "v", "g"), dict(q=r(T, H, K), k=r(T, H, K), v=r(T, H, V),
                                                               g=-torch.rand(T, H, K, generator=gen) * 0.1)
    if op == "gated_delta_rule":
        return op, ("q", "k", "v", "g", "beta"), dict(q=r(T, H, K), k=r(T, H, K), v=r(T, H, V),
                                                      g=-torch.rand(T, H, generator=gen) * 0.1,
                                                      beta=torch.rand(T, H, generator=gen), use_qk_l2norm=True)
    return op, ("x", "dt", "B", "C"), dict(x=r(T, H, P), dt=torch.rand(T, H, generator=gen), A=-torch.rand(H),
                                           B=r(T, G, N), C=r(T, G, N), dt_softplus=True)


def _exchange_alone(nbytes: int) -> float:
    """Seconds of the prefix scan over ranks alone (after a barrier) for summaries of `nbytes`."""
    summary = (torch.ones(nbytes // 4),)
    dist.barrier()
    t0 = time.perf_counter()
    recurrent.scan_ranks(summary, lambda e, l: (e[0] + l[0],))
    return time.perf_counter() - t0


def _rank(rank: int, world: int, port: int, tokens: int, dtypes: tuple, reps: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    part = split_packed(None, tokens, world)[rank]
    for dtype_name in dtypes:
        for case in OPS:
            op, token_args, args = _inputs(case, tokens, getattr(torch, dtype_name))
            mine = {n: (t[part.start:part.stop] if n in token_args else t) for n, t in args.items()}
            sp, single, alone, stats = [], [], [], {}
            for rep in range(reps + 1):                                 # the first round warms up
                dist.barrier()
                if rank == 0:
                    t0 = time.perf_counter()
                    getattr(pa, op)(**args, output_final_state=True)
                    single.append(time.perf_counter() - t0)
                dist.barrier()
                stats = {}
                t0 = time.perf_counter()
                getattr(recurrent, op)(**mine, cu_seqlens=part.cu_seqlens, output_final_state=True, stats=stats)
                sp.append(time.perf_counter() - t0)
                alone.append(_exchange_alone(stats["summary_bytes"]))
            mine_row = dict(sp_s=statistics.median(sp[1:]), exchange_s=statistics.median(alone[1:]),
                            bytes_sent=stats["bytes_sent"])
            gathered = [None] * world
            dist.all_gather_object(gathered, mine_row)
            if rank == 0:
                rows.append(dict(op=case, dtype=dtype_name, world=world, tokens=tokens,
                                 single_s=statistics.median(single[1:]),
                                 sp_s=max(g["sp_s"] for g in gathered),
                                 exchange_s=max(g["exchange_s"] for g in gathered),
                                 bytes_sent=max(g["bytes_sent"] for g in gathered)))
    if rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run(worlds=(2, 4), tokens: int = 8192, dtypes=("float32", "bfloat16"), reps: int = 5) -> list[dict]:
    """One row per (dtype, op, world): medians over `reps` of the slowest rank's seconds per call and of
    the exchange alone, the single-device op's seconds on the whole batch, and the most bytes a rank sent."""
    rows = []
    for world in worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            mp.spawn(_rank, args=(world, port, tokens, tuple(dtypes), reps, path), nprocs=world)
            with open(path) as f:
                rows += json.load(f)
    return rows


def table(rows: list[dict]) -> str:
    head = ("op", "dtype", "ranks", "tokens/rank", "one device ms", "per rank ms", "exchange alone ms",
            "speed-up", "bytes sent/rank")
    body = [(r["op"], r["dtype"], str(r["world"]), str(r["tokens"] // r["world"]), f"{r['single_s'] * 1e3:.1f}",
             f"{r['sp_s'] * 1e3:.1f}", f"{r['exchange_s'] * 1e3:.2f}", f"{r['single_s'] / r['sp_s']:.2f}x",
             f"{r['bytes_sent']:,}") for r in rows]
    widths = [max(len(c[i]) for c in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"{H} heads, K = V = P = N = 64, one sequence of {args.tokens} tokens split over the ranks; torch "
          f"{torch.__version__}, {os.cpu_count()} cores, one thread per rank")
    print(table(run(args.worlds, args.tokens, args.dtype, args.reps)))


if __name__ == "__main__":
    main()
