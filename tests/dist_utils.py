"""Run a function on N CPU processes over gloo (what the distributed tests use instead of GPUs)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int = 2, *args):
    """Call fn(rank, world, *args) in `world` spawned processes; return the list of their results."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), fn, args, results), nprocs=world, join=True)
        return [results[r] for r in range(world)]
