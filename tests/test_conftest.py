"""The shared test helpers themselves: a hung distributed test fails within its deadline, it does not hang."""

from __future__ import annotations

import time

import pytest

from .conftest import run_distributed


def _rank_1_never_joins(rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist

    if rank == 1:
        time.sleep(3600)  # a rank that never reaches the collective
    dist.all_reduce(torch.ones(1))
    return rank


def _ranks(rank: int, world: int, offset: int) -> int:
    return rank + offset


def test_run_distributed_returns_every_ranks_result():
    assert run_distributed(_ranks, 2, 10) == [10, 11]


def test_a_hung_rank_fails_run_distributed_within_its_timeout():
    # rank 1 sleeps an hour; the helper gives up after 10 s and terminates both ranks (alive or still starting)
    with pytest.raises(TimeoutError, match=r"_rank_1_never_joins.*\[0, 1\] still running after 10s"):
        run_distributed(_rank_1_never_joins, 2, timeout=10)
