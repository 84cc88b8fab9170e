"""The distributed per-class sampler's contract, checked for every rank of several world sizes, and its plan checked
against the reference implementation (kept here as `reference_plan`) bit for bit."""

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


# ----------------------------------------------------------------------------- the plan equals the reference's

def reference_plan(labels, batch_size, m, num_replicas, seed, epoch):
    """The sampler's first (per-identity Python) implementation, kept as the definition of the plan: all ranks'
    (steps x classes_per_step x m) indices and aug seeds."""
    step_size = batch_size // m * num_replicas
    chunks, chunk_class, keys, rng = reference_chunks(labels, m, seed, epoch)
    steps = reference_steps(np.argsort(np.asarray(keys), kind="stable"), chunk_class, step_size)
    plan = np.asarray([[chunks[ci] for ci in step] for step in steps], dtype=np.int64)
    plan = plan.reshape(len(steps), step_size, m)
    aug_seeds = rng.integers(0, 2**31 - 1, size=plan.shape, dtype=np.int64)
    return plan, aug_seeds


def reference_chunks(labels, m, seed, epoch):
    """The epoch's chunks of m images (whatever the world size), each one's identity and sort key, and the
    generator after drawing them."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    class_indices = [order[s:s + c] for s, c in zip(starts, counts)]
    rng = np.random.default_rng([seed, epoch])
    chunks, chunk_class, keys = [], [], []
    for c, idx in enumerate(class_indices):
        idx = rng.permutation(idx)
        n_chunks = max(1, -(-len(idx) // m))
        need = n_chunks * m - len(idx)
        if need:
            rest = len(idx) % m
            pool = idx[:-rest] if len(idx) >= m else idx
            idx = np.concatenate([idx, rng.choice(pool, size=need, replace=need > len(pool))])
        u = rng.random()
        for j in range(n_chunks):
            chunks.append(idx[j * m:(j + 1) * m])
            chunk_class.append(c)
            keys.append((j + u) / n_chunks)
    return chunks, chunk_class, keys, rng


def reference_steps(sequence, chunk_class, step_size):
    """Steps of ``step_size`` chunks of distinct identities from ``sequence`` (chunk ids in key order): a chunk
    whose identity is already in the step waits and gets first claim on the next one; left-overs dropped."""
    steps, current, in_step, waiting = [], [], set(), []
    for k in sequence:
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
                if len(current) == step_size:
                    steps.append(current)
                    current, in_step = [], set()
    return steps


def _assert_same_as_reference(labels, batch, m, world, seed=0, epoch=0):
    plan, seeds = reference_plan(labels, batch, m, world, seed, epoch)
    per_rank = batch // m
    for rank in range(world):
        s = DistributedPerClassSampler(labels, batch, m, num_replicas=world, rank=rank, seed=seed)
        s.set_epoch(epoch)
        mine = plan[:, rank * per_rank:(rank + 1) * per_rank].reshape(len(plan), batch)
        theirs = seeds[:, rank * per_rank:(rank + 1) * per_rank].reshape(len(plan), batch)
        expected = [list(zip(i.tolist(), s_.tolist())) for i, s_ in zip(mine, theirs)]
        got = list(s)
        assert s.steps_per_epoch() == len(plan)
        assert got == expected, f"rank {rank} of {world} differs from the reference plan"
        assert all(type(i) is int and type(a) is int for b in got[:3] for i, a in b)
    return plan


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("epoch,seed", [(0, 0), (3, 7)])
def test_plan_equals_reference_on_the_contract_data(world, epoch, seed):
    _assert_same_as_reference(_labels(), 8, 4, world, seed, epoch)


def _random_labels(rng, classes, kind):
    if kind == "uniform":
        counts = rng.integers(1, 12, size=classes)
    elif kind == "small":  # mostly identities with fewer than m images
        counts = rng.integers(1, 4, size=classes)
    else:  # long-tailed, a few large identities whose chunks clash within a step
        counts = np.minimum(400, np.maximum(1, (rng.pareto(1.0, size=classes) * 4).astype(int)))
    ids = rng.choice(10 * classes, size=classes, replace=False)  # sparse, unsorted label values
    return rng.permutation(np.repeat(ids, counts))


@pytest.mark.parametrize("case", range(24))
def test_plan_equals_reference_on_random_label_sets(case):
    rng = np.random.default_rng(1000 + case)
    kind = ("uniform", "small", "long-tailed")[case % 3]
    m = (1, 2, 3, 4, 5, 8)[case % 6]
    world, per_rank = 1 + case % 4, 1 + (case // 4) % 3
    labels = _random_labels(rng, int(rng.integers(world * per_rank, 150)), kind)
    _assert_same_as_reference(labels, per_rank * m, m, world, seed=case, epoch=case % 5)


def test_plan_equals_reference_on_a_medium_set_with_clashes(monkeypatch):
    """Both ways of making steps: runs of clash-free steps at once, and the chunk-by-chunk replay."""
    from facesiam.data import sampler as module

    replays = []
    real = module._replay
    monkeypatch.setattr(module, "_replay", lambda *a: replays.append(1) or real(*a))
    rng = np.random.default_rng(7)
    labels = np.concatenate([_random_labels(rng, 3000, "long-tailed"), np.repeat([-1, -2], 900)])
    plan = _assert_same_as_reference(labels, 16, 4, 16, seed=3, epoch=1)
    assert len(plan) > 100 and replays, "the data must clash"
    assert len(replays) < len(plan) / 4, "most steps come in clash-free runs"


def test_plan_equals_reference_on_a_medium_set_of_many_identities():
    """More identities than one stretch of the draw loop, several epochs."""
    rng = np.random.default_rng(8)
    labels = _random_labels(rng, 12000, "uniform")
    for epoch in range(2):
        _assert_same_as_reference(labels, 32, 4, 3, seed=9, epoch=epoch)


def test_plan_equals_reference_through_the_rare_draw_paths(monkeypatch):
    """The stretches redrawn with numpy's choice (forced here on every other stretch of 5 identities), numpy's
    tail-shuffle choice (pool > 10000, need > pool // 50) and augmentation seeds drawn in several blocks."""
    from facesiam.data import sampler as module

    calls = []
    real = module._unsettled
    monkeypatch.setattr(module, "_SEGMENT", 5)
    monkeypatch.setattr(module, "_SEED_VALUES", 50)
    monkeypatch.setattr(module, "_unsettled", lambda f, b: calls.append(1) or len(calls) % 2 == 0 or real(f, b))
    rng = np.random.default_rng(11)
    _assert_same_as_reference(_random_labels(rng, 80, "uniform"), 12, 3, 2, seed=5, epoch=2)
    assert len(calls) > 4
    labels = np.repeat(np.arange(5), [10300, 700, 11000, 5, 1])
    _assert_same_as_reference(labels, 512, 512, 1, seed=1)


def test_one_photo_per_identity():
    """Unlabeled photos (each its own identity, m = 1): every photo once an epoch."""
    labels = np.arange(50)[::-1]
    plan = _assert_same_as_reference(labels, 5, 1, 2, seed=2)
    assert sorted(plan.reshape(-1).tolist()) == list(range(50))


# ----------------------------------------------------------------------------- elastic resize: the rest re-dealt

def _stretch(labels, world, epoch, earlier=(), steps=None, batch=8, m=4, seed=0, start=0):
    """Every rank's batches of one stretch of an epoch at ``world`` ranks: steps x ranks x (index, aug_seed)."""
    per_rank = []
    for rank in range(world):
        s = DistributedPerClassSampler(labels, batch, m, num_replicas=world, rank=rank, seed=seed)
        s.set_epoch(epoch, start_step=start, earlier=earlier)
        batches = list(s)
        assert len(s) == len(batches)
        per_rank.append(batches if steps is None else batches[:steps])
    return [list(step) for step in zip(*per_rank)]


def _indices(stretch):
    return [i for step in stretch for batch in step for i, _ in batch]


def test_resize_2_1_2_trains_every_image_of_the_epoch_exactly_once():
    """40 identities x 8 images, m = 4: 80 chunks, every image in exactly one; 5 steps on 2 ranks, 6 on one, the
    rest on 2 ranks again: every image of the epoch once, none twice, none left out."""
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(40), 8))
    first = _stretch(labels, 2, epoch=1, steps=5)
    second = _stretch(labels, 1, epoch=1, earlier=[(2, 8, 5)], steps=6)
    rest = _stretch(labels, 2, epoch=1, earlier=[(2, 8, 5), (1, 8, 6)])
    assert len(rest) == (80 - 5 * 4 - 6 * 2) // 4
    seen = _indices(first) + _indices(second) + _indices(rest)
    assert sorted(seen) == list(range(len(labels)))
    for step in first + second + rest:  # the per-rank contract holds in every stretch
        ids = [set(labels[[i for i, _ in batch]].tolist()) for batch in step]
        assert all(len(c) == 2 for c in ids) and len(set().union(*ids)) == 2 * len(step)
        assert all(len(set(labels[[i for i, _ in batch[k:k + 4]]].tolist())) == 1 for batch in step for k in (0, 4))
    seeds = [a for stretch in (first, second, rest) for step in stretch for batch in step for _, a in batch]
    assert len(set(seeds)) > 0.99 * len(seeds)


def reference_resize(labels, m, seed, epoch, stretches):
    """The reference's re-deal: each stretch (world, batch, steps; None: to the epoch's end) makes steps by
    reference_steps from the chunks the stretches before left, in key order. The chunks (as image-index tuples)
    of each stretch's steps, and the chunks never taken."""
    chunks, chunk_class, keys, _ = reference_chunks(labels, m, seed, epoch)
    sequence = [int(k) for k in np.argsort(np.asarray(keys), kind="stable")]
    out = []
    for world, batch, steps in stretches:
        made = reference_steps(sequence, chunk_class, world * batch // m)[:steps]
        used = {ci for step in made for ci in step}
        sequence = [ci for ci in sequence if ci not in used]
        out.append([[tuple(chunks[ci].tolist()) for ci in step] for step in made])
    return out, [tuple(chunks[ci].tolist()) for ci in sequence], [tuple(c.tolist()) for c in chunks]


@pytest.mark.parametrize("case", range(9))
def test_resize_deals_the_rest_of_the_epoch_like_the_reference(case):
    """Random label sets (identities with clashing chunks, top-ups) through 2 -> 1 -> 2 -> 3 ranks: each stretch
    is the reference's re-deal chunk for chunk, and over the stretches no chunk of the epoch comes twice."""
    rng = np.random.default_rng(2000 + case)
    m = (1, 2, 4)[case % 3]
    per_rank = 1 + case % 2
    labels = _random_labels(rng, int(rng.integers(12, 120)), ("uniform", "small", "long-tailed")[case % 3])
    batch = per_rank * m
    plan = [(2, batch, int(rng.integers(0, 4))), (1, batch, int(rng.integers(1, 5))), (2, batch, 2), (3, batch, None)]
    expected, left, every = reference_resize(labels, m, case, case % 4, plan)
    taken = [(world, batch_, len(steps)) for (world, batch_, _), steps in zip(plan, expected)]  # as many as there are
    seen = []
    for k, (world, _, steps) in enumerate(plan):
        got = _stretch(labels, world, case % 4, earlier=taken[:k], steps=steps, batch=batch, m=m, seed=case)
        got = [[tuple(i for i, _ in batch_[j:j + m]) for batch_ in step for j in range(0, batch, m)] for step in got]
        assert got == expected[k], f"stretch {k} ({world} ranks) differs from the reference's re-deal"
        seen += [c for step in got for c in step]
    # Each chunk of the epoch taken once (chunks of an identity topped up from itself may hold the same images).
    from collections import Counter

    assert Counter(seen) + Counter(left) == Counter(every)
    assert len(left) < 3 * per_rank + len(set(labels.tolist())), "only the last stretch's left-overs are dropped"


def test_resume_inside_a_re_dealt_stretch_is_exact():
    labels = _labels()
    full = _stretch(labels, 1, epoch=2, earlier=[(2, 8, 3)], seed=4)
    assert _stretch(labels, 1, epoch=2, earlier=[(2, 8, 3)], seed=4, start=4) == full[4:]


def test_an_earlier_stretch_longer_than_its_plan_is_refused():
    s = DistributedPerClassSampler(_labels(), 8, 4, num_replicas=1)
    s.set_epoch(0, earlier=[(2, 8, 10_000)])
    with pytest.raises(ValueError, match="not of this data"):
        s.steps_per_epoch()
