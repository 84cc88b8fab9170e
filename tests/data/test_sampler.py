"""The distributed per-class sampler's contract, checked for every rank of several world sizes."""

import numpy as np
import pytest

from facesiam.data.sampler import DistributedPerClassSampler


def _labels(seed=0, classes=60):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, size=classes)  # includes identities with fewer than m images
    return np.repeat(np.arange(classes), counts)


def _epoch(labels, world, epoch=0, seed=0, batch=8, m=4):
    samplers = [DistributedPerClassSampler(labels, batch, m, num_replicas=world, rank=r, seed=seed)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_per_rank_contract(world):
    labels = _labels()
    batches = _epoch(labels, world)
    lengths = {len(b) for b in batches}
    assert len(lengths) == 1 and lengths.pop() > 0, "all ranks take the same number of steps"
    for step in range(len(batches[0])):
        step_classes = []
        for rank in range(world):
            batch = batches[rank][step]
            assert len(batch) == 8
            idx = [i for i, _ in batch]
            cls = labels[idx]
            uniq, counts = np.unique(cls, return_counts=True)
            assert len(uniq) == 2 and set(counts) == {4}, "batch_size/m identities x m images"
            for k in range(0, 8, 4):  # each identity's m images are contiguous
                assert len(set(cls[k:k + 4])) == 1
            step_classes.append(set(uniq.tolist()))
        union = set().union(*step_classes)
        assert len(union) == sum(len(s) for s in step_classes), "identities disjoint across ranks within a step"


def test_epoch_visits_about_every_image_and_uses_replacement_only_when_needed():
    labels = _labels()
    batches = _epoch(labels, 2)
    seen = [i for rank in batches for b in rank for i, _ in b]
    coverage = len(set(seen)) / len(labels)
    assert coverage > 0.9
    counts = np.bincount(labels)
    # An identity with >= m images never repeats an image within one chunk.
    for rank in batches:
        for b in rank:
            for k in range(0, 8, 4):
                chunk = [i for i, _ in b[k:k + 4]]
                if counts[labels[chunk[0]]] >= 4:
                    assert len(set(chunk)) == 4


def test_deterministic_and_epoch_dependent():
    labels = _labels()
    a, b = _epoch(labels, 2, epoch=3, seed=7), _epoch(labels, 2, epoch=3, seed=7)
    assert a == b
    assert _epoch(labels, 2, epoch=4, seed=7) != a
    assert _epoch(labels, 2, epoch=3, seed=8) != a
    seeds = [s for rank in a for batch in rank for _, s in batch]
    assert len(set(seeds)) > 0.99 * len(seeds), "augmentation seeds differ per sample"


def test_start_step_resumes_mid_epoch():
    labels = _labels()
    s = DistributedPerClassSampler(labels, 8, 4, num_replicas=2, rank=1, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=5)
    assert len(s) == len(full) - 5
    assert list(s) == full[5:]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of m_per_class"):
        DistributedPerClassSampler(_labels(), 10, 4)
    with pytest.raises(ValueError, match="distinct identities"):
        DistributedPerClassSampler(np.repeat(np.arange(3), 10), 16, 4, num_replicas=1)
