"""LFW-format pairs files: read, resolve against a data set, evaluate with 10-fold accuracy, and make new ones.

Format (Huang et al., LFW, 2007): a header ``FOLDS N`` followed, fold by fold, by N same-identity lines
``name i j`` and N different-identity lines ``name1 i name2 j``; or a header with one number ``N`` (one set of N
same then N different pairs, like pairsDevTrain.txt), which is split into 10 interleaved folds. Image numbers are
1-based. ``name i`` is the image ``name_%04d`` (i) when the identity's files follow LFW's naming, else the i-th
image of the identity in sorted path order; make_pairs writes numbers by the same rule, so files round-trip.

    facesiam make-pairs DATA --out pairs.txt [--split val] [--folds 10 --pairs-per-fold 300 --seed 0]
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..fileio import write_text

log = logging.getLogger("facesiam.pairs")


DEFAULT_FOLDS = 10


@dataclass(frozen=True)
class Pair:
    """One line of a pairs file; image numbers are 1-based as in the file."""

    name1: str
    image1: int
    name2: str
    image2: int

    @property
    def same(self) -> bool:
        return self.name1 == self.name2


def read_pairs(path: str | os.PathLike) -> list[list[Pair]]:
    """The pairs of each fold. Raises ValueError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found; write one with tools/make_pairs.py DATA --out {path}")
    lines = [(no, line.split()) for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(no, tok) for no, tok in lines if tok]
    if not lines:
        raise InputError(f"{path}: empty pairs file")
    head_no, head = lines[0]
    try:
        numbers = [int(t) for t in head]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise InputError(f"{path}:{head_no}: header must be 'FOLDS N' or 'N' (pairs per class), got {' '.join(head)!r}")
    pairs = []
    for no, tok in lines[1:]:
        try:
            if len(tok) == 3:
                pairs.append(Pair(tok[0], int(tok[1]), tok[0], int(tok[2])))
            elif len(tok) == 4:
                pairs.append(Pair(tok[0], int(tok[1]), tok[2], int(tok[3])))
            else:
                raise ValueError
        except ValueError:
            raise InputError(f"{path}:{no}: expected 'name i j' or 'name1 i name2 j', got {' '.join(tok)!r}") from None
        if pairs[-1].image1 < 1 or pairs[-1].image2 < 1:
            raise InputError(f"{path}:{no}: image numbers are 1-based, got {' '.join(tok)!r}")
    if len(numbers) == 2:
        folds, n = numbers
        if len(pairs) != folds * 2 * n:
            raise InputError(f"{path}: header says {folds} folds x {n} same + {n} different pairs = {folds * 2 * n} "
                             f"lines, found {len(pairs)}")
        out = [pairs[f * 2 * n:(f + 1) * 2 * n] for f in range(folds)]
        for f, fold in enumerate(out):
            if sum(p.same for p in fold) != n:
                raise InputError(f"{path}: fold {f + 1} should hold {n} same and {n} different pairs, in that order")
        return out
    (n,) = numbers
    same = [p for p in pairs if p.same]
    diff = [p for p in pairs if not p.same]
    if len(same) != n or len(diff) != n:
        raise InputError(f"{path}: header says {n} same and {n} different pairs, found {len(same)} and {len(diff)}")
    return [same[f::DEFAULT_FOLDS] + diff[f::DEFAULT_FOLDS] for f in range(DEFAULT_FOLDS)]


def write_pairs(folds: Sequence[Sequence[Pair]], path: str | os.PathLike) -> Path:
    """Write a 'FOLDS N' pairs file atomically (each fold: N same pairs, then N different pairs)."""
    path = Path(path)
    n = sum(p.same for p in folds[0]) if folds else 0
    lines = [f"{len(folds)}\t{n}"]
    for fold in folds:
        same, diff = [p for p in fold if p.same], [p for p in fold if not p.same]
        if len(same) != n or len(diff) != n:
            raise InputError("every fold needs the same number of same and different pairs")
        lines += [f"{p.name1}\t{p.image1}\t{p.image2}" for p in same]
        lines += [f"{p.name1}\t{p.image1}\t{p.name2}\t{p.image2}" for p in diff]
    return write_text(path, "\n".join(lines) + "\n")


class ImageNumbers:
    """Maps (identity name, 1-based image number) to a row of a data set / embeddings file, and back."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str]):
        labels = np.asarray(labels)
        self.by_name: dict[str, list[int]] = {}
        for row in np.argsort(np.asarray(paths, dtype=object), kind="stable"):
            self.by_name.setdefault(str(classes[labels[row]]), []).append(int(row))
        self.paths = list(paths)
        self.lfw_style: dict[str, dict[int, int]] = {}
        for name, rows in self.by_name.items():
            pattern = re.compile(rf"^{re.escape(name)}_(\d{{4}})$")
            numbers = [pattern.match(PurePosixPath(self.paths[r]).stem) for r in rows]
            if all(numbers):
                self.lfw_style[name] = {int(m.group(1)): r for m, r in zip(numbers, rows)}
        self._lfw_number = {r: n for table in self.lfw_style.values() for n, r in table.items()}

    def row(self, name: str, number: int) -> Optional[int]:
        """The data row of image ``number`` of ``name``, or None when absent."""
        if name in self.lfw_style:
            return self.lfw_style[name].get(number)
        rows = self.by_name.get(name)
        return rows[number - 1] if rows and 1 <= number <= len(rows) else None

    def number(self, row: int, name: str) -> int:
        """The pairs-file image number of a data row (inverse of ``row``)."""
        if name in self.lfw_style:
            return self._lfw_number[row]
        return self.by_name[name].index(row) + 1


def resolve_pairs(folds: Sequence[Sequence[Pair]], numbers: ImageNumbers,
                  source: str = "the pairs file") -> list[np.ndarray]:
    """Per fold, an (n, 3) int array of (row1, row2, same). Every image must exist in the data."""
    out, missing, total = [], [], 0
    for fold in folds:
        rows = []
        for p in fold:
            total += 1
            a, b = numbers.row(p.name1, p.image1), numbers.row(p.name2, p.image2)
            if a is None or b is None:
                missing.append(p)
                continue
            rows.append((a, b, int(p.same)))
        out.append(np.asarray(rows, dtype=np.int64).reshape(-1, 3))
    if missing:
        p = missing[0]
        have = {n: len(numbers.by_name.get(n, [])) for n in (p.name1, p.name2)}
        raise InputError(f"{source}: {len(missing)} of {total} pairs name images not in the data (first: "
                         f"{p.name1} {p.image1} / {p.name2} {p.image2}; images per identity there: {have}); "
                         "evaluate with the data set the pairs file was made for")
    return out


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising plain accuracy of 'same if score >= threshold', exactly (by sorting).

    The threshold is the midpoint between the two scores at the best cut, so it generalises to unseen pairs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last = np.r_[s[1:] != s[:-1], True]               # cut after the last of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    correct = np.r_[(~y).sum(), tp + ((~y).sum() - fp)]  # accept nothing, then accept down to each distinct score
    best = int(np.argmax(correct))
    cuts = s[last]
    if best == 0:
        threshold = cuts[0] + 1e-6
    elif best == len(cuts):
        threshold = cuts[-1] - 1e-6
    else:
        threshold = (cuts[best - 1] + cuts[best]) / 2
    return float(threshold), float(correct[best] / len(s))


def pairs_metrics(embeddings: np.ndarray, resolved: Sequence[np.ndarray], source: str = "") -> dict:
    """10-fold accuracy (threshold from the other folds), AUC, EER and TAR@FAR over all pairs."""
    from .verification import score_metrics

    emb = np.asarray(embeddings, dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    scores = [np.einsum("ij,ij->i", emb[r[:, 0]], emb[r[:, 1]]).astype(np.float64) for r in resolved]
    same = [r[:, 2].astype(bool) for r in resolved]
    folds = []
    for f in range(len(resolved)):
        train_s = np.concatenate([s for g, s in enumerate(scores) if g != f] or [np.zeros(0)])
        train_y = np.concatenate([y for g, y in enumerate(same) if g != f] or [np.zeros(0, bool)])
        if len(resolved) == 1:  # a single fold: the threshold can only come from the fold itself
            train_s, train_y = scores[f], same[f]
        threshold, _ = best_threshold(train_s, train_y)
        acc = float(np.mean((scores[f] >= threshold) == same[f])) if len(scores[f]) else None
        folds.append({"fold": f + 1, "accuracy": acc, "threshold": threshold, "n_pairs": int(len(scores[f]))})
    all_s, all_y = np.concatenate(scores), np.concatenate(same)
    accs = [f["accuracy"] for f in folds if f["accuracy"] is not None]
    out = {"file": source, "n_pairs": int(len(all_s)), "n_same": int(all_y.sum()),
           "n_different": int((~all_y).sum()), "folds": folds,
           "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "threshold": float(np.mean([f["threshold"] for f in folds]))}
    out.update(score_metrics(all_s, all_y))
    return out


def evaluate_pairs_file(pairs_file: str | os.PathLike, embeddings: np.ndarray, paths: Sequence[str],
                        labels: Sequence[int], classes: Sequence[str]) -> dict:
    """Read, resolve against (paths, labels, classes) and score a pairs file: the metrics.json "pairs" entry."""
    folds = read_pairs(pairs_file)
    resolved = resolve_pairs(folds, ImageNumbers(paths, labels, classes), str(pairs_file))
    return pairs_metrics(embeddings, resolved, str(pairs_file))


def make_pairs(paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], *, folds: int = DEFAULT_FOLDS,
               pairs_per_fold: int = 300, seed: int = 0) -> list[list[Pair]]:
    """Random same/different pairs, LFW-style: people are split among folds (disjoint) when there are enough.

    No pair repeats. Falls back to sharing people among folds (with a warning) when a fold's people cannot
    give ``pairs_per_fold`` distinct pairs of each kind.
    """
    rng = np.random.default_rng(seed)
    numbers = ImageNumbers(paths, labels, classes)
    bad = [n for n in numbers.by_name if not n or any(c.isspace() for c in n)]
    if bad:
        raise InputError(f"identity names must not contain whitespace for the pairs format (e.g. {bad[0]!r})")
    names = sorted(numbers.by_name)
    size = {n: len(numbers.by_name[n]) for n in names}

    def capacity(people: Sequence[str]) -> tuple[int, int]:
        same = sum(size[n] * (size[n] - 1) // 2 for n in people)
        counts = np.array([size[n] for n in people], dtype=np.int64)
        diff = int((counts.sum() ** 2 - (counts ** 2).sum()) // 2)
        return same, diff

    shuffled = list(rng.permutation(names))
    groups = [shuffled[f::folds] for f in range(folds)]
    disjoint = all(min(capacity(g)) >= pairs_per_fold * 2 for g in groups)  # x2: leave room for random draws
    if not disjoint:
        total_same, total_diff = capacity(names)
        if min(total_same, total_diff) < folds * pairs_per_fold:
            raise InputError(f"the data allow only {total_same} distinct same-identity pairs and {total_diff} "
                             f"different ones; ask for fewer than {folds} x {pairs_per_fold} (--pairs-per-fold)")
        log.warning("not enough identities for %d folds with distinct people; folds share people", folds)
        groups = [names] * folds
    used: set[tuple] = set()
    out = []
    for group in groups:
        multi = [n for n in group if size[n] >= 2]
        same_pairs, diff_pairs = [], []
        attempts = 0
        while len(same_pairs) < pairs_per_fold:
            attempts += 1
            if attempts > 1000 * pairs_per_fold:
                raise InputError("could not draw enough distinct same-identity pairs; use --pairs-per-fold lower")
            name = multi[rng.integers(len(multi))]
            a, b = sorted(rng.choice(size[name], 2, replace=False))
            key = (name, a, name, b)
            if key in used:
                continue
            used.add(key)
            rows = numbers.by_name[name]
            same_pairs.append(Pair(name, numbers.number(rows[a], name), name, numbers.number(rows[b], name)))
        attempts = 0
        while len(diff_pairs) < pairs_per_fold:
            attempts += 1
            if attempts > 1000 * pairs_per_fold:
                raise InputError("could not draw enough distinct different-identity pairs; use --pairs-per-fold lower")
            i, j = rng.choice(len(group), 2, replace=False)
            n1, n2 = sorted((group[i], group[j]))
            a, b = int(rng.integers(size[n1])), int(rng.integers(size[n2]))
            key = (n1, a, n2, b)
            if key in used:
                continue
            used.add(key)
            diff_pairs.append(Pair(n1, numbers.number(numbers.by_name[n1][a], n1),
                                   n2, numbers.number(numbers.by_name[n2][b], n2)))
        out.append(same_pairs + diff_pairs)
    return out
