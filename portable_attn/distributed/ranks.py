"""Run a function on N gloo ranks over loopback, each in a spawned process, bounded in time (the
distributed tests and `python -m portable_attn.bench.distributed` use it).

`run_ranks(fn, world, *args)` calls `fn(rank, world, *args)` on every rank inside an initialised
process group and returns once all ranks finished; a rank's exception is raised here with its
traceback, and a run past `timeout` seconds kills every rank and raises TimeoutError. `fn` must be a
module-level function (spawned processes import it by name).
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


PEER_GRACE_S = 5.0  # a rank that lost a peer waits this long before failing, so that the peer's error wins


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share this machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()
    except RuntimeError as exc:
        if "Connection" in str(exc):  # a peer failed and closed its connections: let its error be reported
            time.sleep(PEER_GRACE_S)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), fn, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} still running after {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
