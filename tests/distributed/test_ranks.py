"""The rank harness itself: ranks talk over gloo, a failing rank fails the test, a stuck one times out."""
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from .ranks import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank 1 fails")


def _hang(rank, world):
    if rank == 0:
        dist.recv(torch.empty(1), src=1)  # rank 1 never sends


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_reduce(world):
    run_ranks(_sum_ranks, world)


def test_failing_rank_raises():
    with pytest.raises(ProcessRaisedException, match="rank 1 fails"):
        run_ranks(_fail_on_one, 2)


def test_stuck_ranks_time_out():
    with pytest.raises(TimeoutError, match="still running"):
        run_ranks(_hang, 2, timeout=10)
