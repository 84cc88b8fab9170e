"""DistributedPerClassSampler: P identities x m images per batch, identities disjoint across ranks, exactly resumable.

pytorch-metric-learning's MPerClassSampler has no distributed version (its maintainer says so), gives ranks
no common step count, and has no position to save, so this one is written here. Each epoch is planned from
(seed, epoch) alone, identically on every rank:

1. every identity's images are shuffled and cut into chunks of m (a short last chunk is topped up by drawing
   from the identity again; identities with fewer than m images are drawn with replacement), so an epoch
   visits about every image once;
2. chunk j of an identity with n chunks gets the sort key (j + u) / n (u uniform per identity), spreading an
   identity's chunks evenly over the epoch; chunks are taken in key order into global steps of
   world_size * batch_size / m chunks of distinct identities (a clash waits for the next step);
3. rank r takes its slice of every step, so identities are disjoint across ranks within a step and every
   rank has the same number of steps.

Each yielded index comes with an augmentation seed, ``(index, aug_seed)``, so a sample's augmentation depends
only on (seed, epoch, position), never on worker count or order (see ShardDataset).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import InputError


class DistributedPerClassSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler: each step yields this rank's ``batch_size`` (index, aug_seed) pairs."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        m_per_class: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if m_per_class < 1 or batch_size % m_per_class:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of m_per_class ({m_per_class})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.m = m_per_class
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.classes_per_rank = batch_size // m_per_class
        self.classes_per_step = self.classes_per_rank * num_replicas
        order = np.argsort(self.labels, kind="stable")
        uniq, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
        self._class_indices = [order[s:s + c] for s, c in zip(starts, counts)]
        if len(uniq) < self.classes_per_step:
            raise InputError(
                f"a step needs {self.classes_per_step} distinct identities ({num_replicas} process(es) x "
                f"{batch_size}/{m_per_class}) but the data has {len(uniq)}; lower batch_size or raise m_per_class"
            )
        self.epoch = 0
        self.start_step = 0
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to plan and the step to start from (for resuming mid-epoch)."""
        self.epoch = epoch
        self.start_step = start_step

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps x classes_per_step x m) indices and matching aug seeds for the current epoch."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1], self._plan_cache[2]
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks: list[np.ndarray] = []
        chunk_class: list[int] = []
        keys: list[float] = []
        for c, idx in enumerate(self._class_indices):
            idx = rng.permutation(idx)
            n_chunks = max(1, -(-len(idx) // self.m))
            need = n_chunks * self.m - len(idx)
            if need:
                # Top the last chunk up with images it does not hold yet; repeats only when the identity is short.
                rest = len(idx) % self.m
                pool = idx[:-rest] if len(idx) >= self.m else idx
                idx = np.concatenate([idx, rng.choice(pool, size=need, replace=need > len(pool))])
            u = rng.random()
            for j in range(n_chunks):
                chunks.append(idx[j * self.m:(j + 1) * self.m])
                chunk_class.append(c)
                keys.append((j + u) / n_chunks)
        steps: list[list[int]] = []
        current: list[int] = []
        in_step: set[int] = set()
        waiting: list[int] = []
        for k in np.argsort(np.asarray(keys), kind="stable"):
            # Chunks that clashed with an earlier step get first claim on the next one.
            for queue in (waiting, [int(k)]):
                for ci in list(queue):
                    if chunk_class[ci] in in_step:
                        if queue is not waiting:
                            waiting.append(ci)
                        continue
                    if queue is waiting:
                        waiting.remove(ci)
                    current.append(ci)
                    in_step.add(chunk_class[ci])
                    if len(current) == self.classes_per_step:
                        steps.append(current)
                        current, in_step = [], set()
        # Left-overs (fewer than a step, or clashing) are dropped: every rank must have the same step count.
        plan = np.asarray([[chunks[ci] for ci in step] for step in steps], dtype=np.int64)
        plan = plan.reshape(len(steps), self.classes_per_step, self.m)
        aug_seeds = rng.integers(0, 2**31 - 1, size=plan.shape, dtype=np.int64)
        self._plan_cache = (self.epoch, plan, aug_seeds)
        return plan, aug_seeds

    def steps_per_epoch(self) -> int:
        """Steps every rank takes in the current epoch."""
        return len(self._plan()[0])

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan, seeds = self._plan()
        lo, hi = self.rank * self.classes_per_rank, (self.rank + 1) * self.classes_per_rank
        for step in range(self.start_step, len(plan)):
            idx = plan[step, lo:hi].reshape(-1)
            sd = seeds[step, lo:hi].reshape(-1)
            yield [(int(i), int(s)) for i, s in zip(idx, sd)]
