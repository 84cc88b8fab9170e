"""A stand-in teacher and process helpers for the teacher-pass tests (importable by spawned and child processes)."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Prepared:
    input: Optional[np.ndarray]
    found_by: str


class FakeTeacher:
    """Embeds a photo as a fixed random projection of its 4x4 thumbnail; 'finds no face' in photos whose thumbnail's
    first pixel is a multiple of 5 (a fixed, image-dependent subset). ``kill_after``: SIGKILL itself on that call
    (only in the process that made it, not in a helper given it pickled). ``delay``: seconds each embed call takes.
    ``pids``: a folder where each process that embeds leaves a file named by its pid."""

    dim = 8

    def __init__(self, tag: str = "a", kill_after: Optional[int] = None, delay: float = 0.0,
                 pids: Optional[str] = None):
        self.name = f"fake-{tag}"
        self.tag = tag
        self.kill_after, self.delay, self.pids, self.home = kill_after, delay, pids, os.getpid()
        self.prepared = 0
        self.embed_calls = 0
        self.weights = np.random.default_rng(0).normal(size=(48, self.dim)).astype(np.float32)

    def fingerprint(self) -> dict:
        return {"name": "fake", "tag": self.tag}

    def prepare(self, image, landmarks=None) -> Prepared:
        self.prepared += 1
        thumb = np.asarray(image.convert("RGB").resize((4, 4)), np.float32)
        if int(thumb[0, 0, 0]) % 5 == 0:
            return Prepared(None, "none")
        return Prepared(thumb.reshape(-1) / 255.0, "teacher" if landmarks is None else "landmarks")

    def embed(self, inputs) -> np.ndarray:
        self.embed_calls += 1
        if self.pids:
            open(os.path.join(self.pids, str(os.getpid())), "a").close()
        if self.kill_after is not None and self.embed_calls > self.kill_after and os.getpid() == self.home:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        out = np.stack(inputs) @ self.weights
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    @staticmethod
    def mirror(input: np.ndarray) -> np.ndarray:
        return input.reshape(4, 4, 3)[:, ::-1].reshape(-1)


class GlooProcess:
    """The same, for a rank of an initialised torch.distributed gloo group."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def targets(data, teacher, accelerator=None, batch_size: int = 8):
    """The train split's teacher targets as a distillation run gets them (the stored images)."""
    from facesiam.training.teacher_pass import teacher_targets

    return teacher_targets(data, "train", teacher, source="shards", batch_size=batch_size, accelerator=accelerator)


def fill_on_rank(rank: int, world: int, data: str, chunk: int):
    """run_distributed target: each rank fills its chunks; returns what it loaded and how many photos it prepared."""
    from facesiam.training import teacher_pass

    teacher_pass.CHUNK = chunk
    teacher = FakeTeacher()
    emb, found = targets(data, teacher, GlooProcess(rank, world))
    return emb, found, teacher.prepared


if __name__ == "__main__":  # python -m tests.training.distill_helpers SHARDS CHUNK KILL_AFTER [PIDS]: killed mid-pass
    from facesiam.training import teacher_pass

    teacher_pass.CHUNK = int(sys.argv[2])
    if len(sys.argv) > 4:  # with a helper process (processes=2), each embed call slow enough to outlive this one
        teacher_pass.teacher_targets(sys.argv[1], "train", FakeTeacher(kill_after=int(sys.argv[3]), delay=0.2,
                                                                       pids=sys.argv[4]),
                                     source="shards", batch_size=4, processes=2)
    else:
        targets(sys.argv[1], FakeTeacher(kill_after=int(sys.argv[3])))

