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

An elastic resize mid-epoch (a checkpoint of W ranks resumed on W' ranks) continues the same epoch: its chunks
(step 1, independent of the world size) less those the steps already taken at earlier world sizes used, still in
key order, are dealt by step 2's rules into steps of the new size (``set_epoch(..., earlier=...)``), so across
the resize every chunk is trained on once, as without one (only the left-overs of the epoch's last step are
dropped). Without a resize the plan is unchanged, so a resume on the same world size stays exact.

Each yielded index comes with an augmentation seed, ``(index, aug_seed)``, so a sample's augmentation depends
only on (seed, epoch, position), never on worker count or order (see ShardDataset).

The plan is made with numpy arrays, and each rank keeps only its own slice (42M photos of 2M identities: ~12 s
and 0.7 GB per rank per epoch on 2 shared cores, docs/benchmarks.md). Only step 1's draws stay a loop over
identities: numpy's shuffle draws by rejection, so where an identity's draws end in the random stream is known
only after making them. In that loop the top-up draws are taken as float32s (the same 32-bit words) and finished
in bulk; the rare word whose lost low 8 bits could change a draw sends its stretch of identities back through
numpy's ``choice``. Step 2 takes runs of clash-free steps at once and applies the rules chunk by chunk only
around a clash.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import InputError

_SEGMENT = 8192           # identities per stretch of the draw loop (the generator's state is saved at each start)
_SEED_VALUES = 1 << 22    # augmentation seeds drawn per call (only this rank's are kept)
_MAX_WINDOW = 4096        # steps checked for clashes at once


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
        # Image indices grouped by identity (identities in label order, indices ascending within one).
        order = np.argsort(self.labels, kind="stable")
        sorted_labels = self.labels[order]
        self._index_dtype = np.int32 if len(order) < 2**31 else np.int64
        self._order = order.astype(self._index_dtype)
        del order
        starts = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
        self._starts = np.concatenate([[0], starts]).astype(np.int64) if len(sorted_labels) else starts
        self._counts = np.diff(np.append(self._starts, len(sorted_labels)))
        del sorted_labels
        if len(self._counts) < self.classes_per_step:
            raise InputError(
                f"a step needs {self.classes_per_step} distinct identities ({num_replicas} process(es) x "
                f"{batch_size}/{m_per_class}) but the data has {len(self._counts)}; lower batch_size or raise "
                f"m_per_class"
            )
        self.epoch = 0
        self.start_step = 0
        self.earlier: tuple[tuple[int, int, int], ...] = ()
        self._plan_cache: tuple[tuple, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0,
                  earlier: Sequence[Sequence[int]] = ()) -> None:
        """Select the epoch to plan and the step to start from (for resuming mid-epoch).

        ``earlier``: the steps this epoch already took on other world sizes before an elastic resize, as
        (num_replicas, batch_size, steps) per stretch, oldest first; this world size's plan (and ``start_step``)
        then covers only the chunks they did not take."""
        self.epoch = epoch
        self.start_step = start_step
        self.earlier = tuple((int(w), int(b), int(k)) for w, b, k in earlier)

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (steps x classes_per_rank x m) indices and matching aug seeds for the current epoch."""
        key = (self.epoch, self.earlier)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1], self._plan_cache[2]
        self._plan_cache = None  # free the last epoch's plan before making this one
        m, n, step = self.m, self._counts, self.classes_per_step
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = self._order.copy()
        u, picks, pick_off = _draw(rng, perm, self._starts, n, m)

        # Chunks in identity order, chunk j of an identity with nch chunks keyed (j + u) / nch (float64, as Python).
        nch = np.maximum(1, -(-n // m))
        chunk_off = np.concatenate([[0], np.cumsum(nch)])
        chunk_class = np.repeat(np.arange(len(n), dtype=np.int32), nch)
        chunk_j = (np.arange(chunk_off[-1], dtype=np.int64) - np.repeat(chunk_off[:-1], nch)).astype(np.int32)
        keys = (chunk_j + np.repeat(u, nch)) / np.repeat(nch.astype(np.float64), nch)
        order = np.argsort(keys, kind="stable")
        del keys
        for world, batch, taken in self.earlier:  # an elastic resize: drop what the earlier world sizes took
            if batch % m or world < 1:
                raise ValueError(f"earlier stretch ({world} x batch {batch}) does not fit m_per_class {m}")
            done = _assemble(order, chunk_class, chunk_j, world * batch // m)
            if taken > len(done):
                raise ValueError(f"epoch {self.epoch}: an earlier stretch took {taken} steps of {world} x batch "
                                 f"{batch}, but its plan has {len(done)}; the checkpoint is not of this data")
            left = np.ones(len(order), dtype=bool)
            left[done[:taken].reshape(-1)] = False
            order = order[left]
        rows = _assemble(order, chunk_class, chunk_j, step)  # steps x step, positions in key order

        lo, hi = self.rank * self.classes_per_rank, (self.rank + 1) * self.classes_per_rank
        chunks = order[rows[:, lo:hi]]  # steps x classes_per_rank chunk ids
        del order, rows
        cls, j = chunk_class[chunks][..., None].astype(np.int64), chunk_j[chunks][..., None].astype(np.int64)
        pos = j * m + np.arange(m)  # position in the identity's shuffled images followed by its top-up
        short = pos >= n[cls]
        pos[short] = picks[(pick_off[cls] + pos - n[cls])[short]]
        plan = perm[self._starts[cls] + pos].astype(self._index_dtype, copy=False)
        if self.earlier:  # a stream of its own per stretch: the full plan's seeds are drawn after its chunks
            rng = np.random.default_rng([self.seed, self.epoch, len(self.earlier)])
        seeds = _seeds(rng, len(chunks), step, m, lo, hi)
        self._plan_cache = (key, plan, seeds)
        return plan, seeds

    def steps_per_epoch(self) -> int:
        """Steps every rank takes in the current epoch."""
        return len(self._plan()[0])

    def batch_indices(self, step: int) -> list[int]:
        """This rank's image indices at ``step`` of the current plan (what the loader yields there)."""
        return self._plan()[0][step].reshape(-1).tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan, seeds = self._plan()
        for step in range(self.start_step, len(plan)):
            yield list(zip(plan[step].reshape(-1).tolist(), seeds[step].reshape(-1).tolist()))


def _draw(rng: np.random.Generator, perm: np.ndarray, starts: np.ndarray, n: np.ndarray, m: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1's draws in the reference's order: per identity shuffle its images (in place in ``perm``), draw the
    top-up ``rng.choice(pool, need, replace=need > len(pool))`` and ``u = rng.random()``.

    Returns u per identity, the top-up picks (positions in the identity's shuffled images) and each identity's
    offset into them. numpy's choice costs ~10 us a call, too slow for 2M identities, so its draws are made as
    float32s (``rng.random(k, dtype=float32)`` takes the same 32-bit words) and turned into choice's result in
    bulk (_choice_picks). A word whose low 8 bits (lost in the float32) could change the draw is rare (~6e-8 x
    the pool size); its stretch of identities is drawn again from the saved state with numpy's choice itself.
    """
    rest = n % m
    need = np.maximum(1, -(-n // m)) * m - n
    pool = np.where(n >= m, n - rest, n)
    replace = need > pool
    tail = ~replace & (need > 0) & (pool > 10000) & (need > pool // 50)  # numpy's tail-shuffle branch: use choice
    floyd = ~replace & (need > 0) & ~tail
    floyd_words = np.where(floyd, 2 * need - 1 - (pool == need), 0)   # Floyd's draws (none for j = 0), shuffle's
    words = np.where(replace & (pool > 1), need, floyd_words)
    word_off = np.concatenate([[0], np.cumsum(words)])
    pick_off = np.concatenate([[0], np.cumsum(need)])
    bound = _word_bounds(words, word_off, need, pool, replace)

    floats = np.empty(int(word_off[-1]), dtype=np.float32)
    exact: dict[int, np.ndarray] = {}
    u = np.empty(len(n), dtype=np.float64)
    shuffle, random, choice = rng.shuffle, rng.random, rng.choice
    f32 = np.float32
    ends = starts + n
    word_end = np.where(tail, word_off[:-1] - 1, word_off[1:])  # before its start: numpy's choice
    for c0 in range(0, len(n), _SEGMENT):
        c1 = min(c0 + _SEGMENT, len(n))
        # Python ints for the loop, a stretch at a time (lists for all 2M identities would cost ~0.5 GB).
        starts_l, ends_l, need_l, pool_l = (a[c0:c1].tolist() for a in (starts, ends, need, pool))
        word_l, word_end_l = word_off[c0:c1].tolist(), word_end[c0:c1].tolist()
        saved_state, saved = rng.bit_generator.state, perm[starts_l[0]:ends_l[-1]].copy()
        us: list[float] = []
        append = us.append
        for c, s, e, w, w_end in zip(range(c0, c1), starts_l, ends_l, word_l, word_end_l):
            if e - s > 1:
                shuffle(perm[s:e])
            if w_end > w:
                random(out=floats[w:w_end], dtype=f32)
            elif w_end < w:
                exact[c] = choice(pool_l[c - c0], size=need_l[c - c0], replace=False)
            append(random())
        w0, w1 = int(word_off[c0]), int(word_off[c1])
        if w1 > w0 and _unsettled(floats[w0:w1], bound[w0:w1]):
            rng.bit_generator.state = saved_state
            perm[starts_l[0]:ends_l[-1]] = saved
            us.clear()
            for c, s, e, q, p in zip(range(c0, c1), starts_l, ends_l, need_l, pool_l):
                if e - s > 1:
                    shuffle(perm[s:e])
                if q:
                    exact[c] = choice(p, size=q, replace=q > p)
                append(random())
        u[c0:c1] = us
    picks = _choice_picks(floats, bound, word_off, need, pool, pick_off, replace, floyd)
    for c, p in exact.items():
        picks[pick_off[c]:pick_off[c + 1]] = p
    return u, picks, pick_off


def _word_bounds(words: np.ndarray, word_off: np.ndarray, need: np.ndarray, pool: np.ndarray,
                 replace: np.ndarray) -> np.ndarray:
    """Each top-up word's range (values 0..range-1), in draw order: with replacement ``integers(0, pool)`` per
    pick; without, Floyd's ``j + 1`` for j in max(pool - need, 1)..pool - 1, then the pick shuffle's i + 1 for
    i = need - 1..1."""
    owner = np.repeat(np.arange(len(words)), words)
    t = np.arange(word_off[-1], dtype=np.int64) - word_off[:-1][owner]
    p, q = pool[owner], need[owner]
    nf = q - (p == q)  # Floyd's words: j = 0 draws nothing
    return np.where(replace[owner], p, np.where(t < nf, p - nf + t + 1, q - (t - nf))).astype(np.uint64)


def _lemire(floats: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's bounded draw ((word * bound) >> 32, Lemire) from each word's top 24 bits, and whether the low 8
    bits could change it (either the result or a rejection)."""
    x = (floats.astype(np.float64) * 2.0**24).astype(np.uint64) * (bound << np.uint64(8))
    low = x & np.uint64(0xFFFFFFFF)
    threshold = (np.uint64(2**32) - bound) % bound
    unsettled = (low < threshold) | (low + np.uint64(255) * bound >= np.uint64(2**32))
    return (x >> np.uint64(32)).astype(np.int64), unsettled


def _unsettled(floats: np.ndarray, bound: np.ndarray) -> bool:
    return bool(_lemire(floats, bound)[1].any())


def _choice_picks(floats, bound, word_off, need, pool, pick_off, replace, floyd) -> np.ndarray:
    """numpy's ``choice(pool, need)`` for every identity from its words: with replacement the draws themselves;
    without (pool <= 10000 or need <= pool // 50), Floyd's sampling then a Fisher-Yates shuffle of the picks."""
    value = _lemire(floats, bound)[0]
    picks = np.zeros(int(pick_off[-1]), dtype=np.int64)
    rep = np.flatnonzero(replace & (pool > 1))
    if len(rep):
        at = np.repeat(pick_off[rep], need[rep]) + _ranks(need[rep])
        picks[at] = value[np.repeat(word_off[rep], need[rep]) + _ranks(need[rep])]
    for q in np.unique(need[floyd]).tolist():
        cls = np.flatnonzero(floyd & (need == q))
        p, first = pool[cls], word_off[cls] - (pool[cls] == q)  # word of Floyd's j = pool - q + t is first + t
        out = np.empty((len(cls), q), dtype=np.int64)
        for t in range(q):
            j = p - q + t
            val = np.where(j == 0, 0, value[np.maximum(first + t, 0)])
            seen = (out[:, :t] == val[:, None]).any(axis=1)
            out[:, t] = np.where(seen, j, val)
        rows = np.arange(len(cls))
        for t, i in enumerate(range(q - 1, 0, -1)):
            k = value[first + q + t]
            out[rows, i], out[rows, k] = out[rows, k], out[rows, i].copy()
        picks[pick_off[cls][:, None] + np.arange(q)] = out
    return picks


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count, concatenated."""
    off = np.concatenate([[0], np.cumsum(counts)])
    return np.arange(off[-1], dtype=np.int64) - np.repeat(off[:-1], counts)


def _assemble(order: np.ndarray, chunk_class: np.ndarray, chunk_j: np.ndarray, step: int) -> np.ndarray:
    """Steps of ``step`` chunks of distinct identities, as rows of positions in key order: chunks in key order,
    a chunk whose identity is already in the step waits and gets first claim on the next one, left-overs dropped.

    With the waiting list empty a step is just the next ``step`` chunks unless two of them share an identity,
    and an identity's chunks come in key order in chunk order, so a clash shows as a chunk whose previous chunk
    is in the same step. Runs of steps without one are taken at once; from a clash on, the rules are replayed
    one chunk at a time (_replay) until a step ends with nothing waiting.
    """
    total = len(order)
    cls = chunk_class[order]
    if total == len(chunk_class):  # every chunk: an identity's previous chunk is the chunk id before
        at = np.empty(total, dtype=np.int64)
        at[order] = np.arange(total)
        prev = np.where(chunk_j[order] > 0, at[np.maximum(order - 1, 0)], -1)  # position of the previous chunk
        del at
    else:  # what a resize left: the previous chunk of the same identity still in the sequence
        by_class = np.lexsort((np.arange(total), cls))
        same = cls[by_class[1:]] == cls[by_class[:-1]]
        prev = np.full(total, -1, dtype=np.int64)
        prev[by_class[1:][same]] = by_class[:-1][same]
    blocks: list[np.ndarray] = []
    p, window = 0, 1
    while total - p >= step:
        k = min((total - p) // step, window)
        first = p + step * np.arange(k)
        clash = np.flatnonzero((prev[p:p + k * step].reshape(k, step) >= first[:, None]).any(axis=1))
        clean = int(clash[0]) if len(clash) else k
        if clean:
            blocks.append(first[:clean, None] + np.arange(step))
            p += clean * step
        if clean < k:
            p, replayed = _replay(cls, p, step)
            blocks.extend(replayed)
            window = 1
        else:
            window = min(2 * window, _MAX_WINDOW)
    return np.concatenate(blocks) if blocks else np.empty((0, step), dtype=np.int64)


def _replay(cls: np.ndarray, p: int, step: int) -> tuple[int, list[np.ndarray]]:
    """The reference's rules chunk by chunk from position p (nothing waiting), until a step ends with nothing
    waiting; returns the next position and the steps made.

    The waiting list is only scanned when a step has ended since the last scan: until then the identities in the
    step only grow, so every waiting chunk is still blocked and the reference's scan changes nothing."""
    steps: list[np.ndarray] = []
    current: list[int] = []
    in_step: set[int] = set()
    waiting: list[int] = []
    fresh = False  # a step ended since the waiting list was last scanned
    while p < len(cls):
        k, p = p, p + 1
        # Chunks that clashed with an earlier step get first claim on the next one.
        for queue in (waiting if fresh else [], [k]):
            if queue is waiting:
                fresh = False
            for ci in list(queue):
                c = int(cls[ci])
                if c in in_step:
                    if queue is not waiting:
                        waiting.append(ci)
                    continue
                if queue is waiting:
                    waiting.remove(ci)
                current.append(ci)
                in_step.add(c)
                if len(current) == step:
                    steps.append(np.asarray(current, dtype=np.int64)[None])
                    current, in_step, fresh = [], set(), True
        if not current and not waiting:
            break
    return p, steps


def _seeds(rng: np.random.Generator, steps: int, step: int, m: int, lo: int, hi: int) -> np.ndarray:
    """The reference's ``rng.integers(0, 2**31 - 1, (steps, step, m))``, drawn a block of steps at a time (the
    same words in the same order), keeping this rank's [lo:hi] slice of each step."""
    out = np.empty((steps, hi - lo, m), dtype=np.int32)
    block = max(1, _SEED_VALUES // (step * m))
    for s in range(0, steps, block):
        e = min(s + block, steps)
        out[s:e] = rng.integers(0, 2**31 - 1, size=(e - s, step, m), dtype=np.int64)[:, lo:hi]
    return out
