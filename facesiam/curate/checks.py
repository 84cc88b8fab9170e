"""The doctor's checks: photos -> findings. Each check is one function of ``Photos`` and the settings.

* photo checks read the face detector's record and the aligned crop (no model needed);
* duplicates: identical bytes (SHA-256), and near duplicates: embedding cosine above ``near_duplicate`` confirmed
  by a perceptual hash (imagehash's pHash of the crops), so two photos of one person from one event (close in
  embedding, different pixels) are not called duplicates;
* wrong labels: a photo unlike every other photo of its identity (its best cosine to them below the model's
  threshold at a loose FAR, 1e-2: not even loosely similar) and closer to another identity's centre than to its
  own; its nearest neighbours above the same-person threshold are named as evidence;
* one person under two names: identity centres (of 2 photos or more, wrong-label and duplicate suspects left out)
  above the model's threshold at a strict FAR. A single photo cannot tell a look-alike from the same person.

The nearest neighbours come from the gallery's exact search (eval.gallery.topk_cosine: blocked matmul + top-k),
so 100,000 photos cost seconds next to embedding them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..eval.gallery import topk_cosine
from .findings import KINDS, Finding
from .photos import Photos

SKIP_FINDINGS = {  # alignment record skip -> (finding kind, why)
    "unreadable": ("unreadable", "cannot be read as an image"),
    "error": ("unreadable", "the face could not be aligned"),
    "no_face": ("no_face", "the face detector found no face"),
    "too_small": ("small_face", "the face is smaller than the alignment's min_face_size"),
    "cut_off": ("cut_off", "the face is cut off by the photo's border"),
}


@dataclass
class CheckSettings:
    """Thresholds of the checks; defaults measured on LFW (docs/curate.md)."""

    same_person: float
    """Cosine at or above which two photos show one person: the model's threshold at the report's operating point."""
    stranger: float
    """Cosine below which two photos are not even loosely alike (the threshold at FAR 1e-2): a photo with no other
    photo of its identity above it is a wrong-label candidate."""
    merge: float
    """Cosine of two identity centres at or above which they are probably one person (a stricter FAR: there are
    far more identity pairs than photos of one identity)."""
    near_duplicate: float = 0.95
    """Embedding cosine above which two photos are compared for near-duplicates by perceptual hash."""
    phash_bits: int = 6
    """Greatest pHash Hamming distance (of 64 bits) between near duplicates."""
    blur: float = 25.0
    """Variance of the Laplacian of the grey crop below which a photo is blurred (at the model's input size)."""
    min_confidence: float = 0.95
    """Detector score below which a face is of low confidence (MTCNN scores real faces above 0.99)."""
    neighbours: int = 10
    """k of the nearest neighbours searched per photo (near duplicates, wrong-label evidence)."""
    merge_min_photos: int = 2
    """Identities with fewer photos are not compared for one-person-under-two-names."""


def photo_findings(photos: Photos, s: CheckSettings) -> list[Finding]:
    """Unreadable, no face, several faces, small or cut-off face, blurred, low detector confidence."""
    out = []
    for i, r in enumerate(photos.records):
        file, ident = photos.files[i], photos.identities[i]
        if r is None:
            continue
        if r.get("skip"):
            kind, why = SKIP_FINDINGS.get(r["skip"], ("unreadable", r["skip"]))
            out.append(Finding(kind, [file], [ident], 1.0, "quarantine", [file], [], f"{why}: {r.get('reason')}"))
            continue
        if r.get("faces", 0) > 1:
            out.append(Finding("several_faces", [file], [ident], float(r["faces"]), "review", [], [],
                               f"{r['faces']} faces; the {r.get('reason', 'kept one')} -- check it is the person"))
        if r.get("score") is not None and r["score"] < s.min_confidence:
            out.append(Finding("low_confidence", [file], [ident], 1.0 - r["score"], "quarantine", [file], [],
                               f"detector confidence {r['score']:.3f} < {s.min_confidence}: maybe not a face"))
    for i in np.flatnonzero(photos.sharpness < s.blur):
        out.append(Finding("blurred", [photos.files[i]], [photos.identities[i]],
                           float(s.blur - photos.sharpness[i]) / s.blur, "review", [], [],
                           f"variance of the Laplacian {photos.sharpness[i]:.0f} < {s.blur:.0f}: blurred or "
                           "low resolution"))
    return out


def identity_groups(photos: Photos) -> dict[str, np.ndarray]:
    """Embedded photo rows per identity."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(photos.embedded):
        groups[photos.identities[i]].append(int(i))
    return {k: np.asarray(v) for k, v in groups.items()}


def own_fit(photos: Photos, groups: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine to another photo of the same identity, cosine to the identity's centre without the photo)
    per photo; NaN for photos alone in their identity or without an embedding."""
    n = len(photos)
    best, centre = np.full(n, np.nan), np.full(n, np.nan)
    e = photos.embeddings
    for rows in groups.values():
        if len(rows) < 2:
            continue
        x = e[rows]
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        best[rows] = sim.max(axis=1)
        rest = x.sum(axis=0, keepdims=True) - x
        centre[rows] = np.sum(x * rest, axis=1) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
    return best, centre


def centres(photos: Photos, groups: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(groups)
    c = np.stack([photos.embeddings[groups[k]].sum(axis=0) for k in names]) if names else np.zeros((0, 1))
    return names, (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def duplicate_findings(photos: Photos, s: CheckSettings, nn_scores: np.ndarray, nn_index: np.ndarray,
                       rows: np.ndarray, fit: np.ndarray) -> list[Finding]:
    """Identical files, then near duplicates (kNN cosine >= near_duplicate and pHash distance <= phash_bits).

    Of a group across identities the photo that fits its identity best is kept (``fit``: cosine to the centre
    of its identity's other photos; a photo alone in its identity counts as ``same_person``, neither fitting nor
    contradicted, so a copy dropped among another person's photos loses to it); within one identity the first
    file is kept.
    """
    fit = np.where(np.isnan(fit), s.same_person, fit)
    out, paired = [], set()
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(photos.sha256):
        if h is not None:
            by_hash[h].append(i)
    for group in by_hash.values():
        if len(group) > 1:
            out.append(_duplicate("duplicate", photos, group, fit, 1.0, "identical files"))
            paired.update((a, b) for a in group for b in group)
    hashes: dict[int, object] = {}
    for q, (scores, index) in enumerate(zip(nn_scores, nn_index)):
        a = int(rows[q])
        for score, j in zip(scores, index):
            b = int(rows[j])
            if score < s.near_duplicate:
                break
            if a >= b or (a, b) in paired:
                continue
            distance = _phash(photos, a, hashes) - _phash(photos, b, hashes)
            if distance <= s.phash_bits:
                paired.add((a, b))
                out.append(_duplicate("near_duplicate", photos, [a, b], fit, float(score),
                                      f"embedding cosine {score:.3f}, pHash distance {distance} bits"))
    return out


def _phash(photos: Photos, i: int, cache: dict) -> object:
    if i not in cache:
        import imagehash

        cache[i] = imagehash.phash(photos.image(i))
    return cache[i]


def _duplicate(kind: str, photos: Photos, group: list[int], fit: np.ndarray, score: float, why: str) -> Finding:
    idents = [photos.identities[i] for i in group]
    if len(set(idents)) > 1:
        keep = max(group, key=lambda i: fit[i])
        where = (f"under {len(set(idents))} identities; keeping the one that fits its identity best "
                 f"({photos.files[keep]})")
    else:
        keep = group[0]
        where = "in one identity"
    files = [photos.files[i] for i in group]
    return Finding(kind, files, idents, score, "quarantine", [photos.files[i] for i in group if i != keep],
                   [photos.files[keep]], f"{why} {where}")


def wrong_label_findings(photos: Photos, s: CheckSettings, groups: dict[str, np.ndarray], best_own: np.ndarray,
                         own_centre: np.ndarray, nn_scores: np.ndarray, nn_index: np.ndarray, rows: np.ndarray,
                         exclude: set[int]) -> list[Finding]:
    """Photos that do not look like their identity (see the module docstring); ``exclude``: rows already in a
    duplicate finding (a copied photo is that finding's, not a second one)."""
    names, c = centres(photos, groups)
    if len(names) < 2:
        return []
    # only photos unlike every other photo of their identity are compared with all identities' centres
    candidates = [q for q, i in enumerate(rows) if int(i) not in exclude and best_own[i] < s.stranger]
    top_s, top_i = topk_cosine(photos.embeddings[rows[candidates]], c, 2, normalized=True)
    name_id = {n: k for k, n in enumerate(names)}
    out = []
    for top_s_q, top_i_q, q in zip(top_s, top_i, candidates):
        i = int(rows[q])
        ident = photos.identities[i]
        own = name_id[ident]
        other = top_i_q[0] if top_i_q[0] != own else top_i_q[1]
        other_score = float(top_s_q[0] if top_i_q[0] != own else top_s_q[1])
        if other_score <= own_centre[i]:
            continue
        target = names[other]
        votes = [photos.identities[rows[j]] for sc, j in zip(nn_scores[q], nn_index[q]) if sc >= s.same_person]
        mates = [photos.files[j] for j in groups[ident] if j != i][:4]
        theirs = [photos.files[j] for j in groups[target]][:4]
        out.append(Finding("wrong_label", [photos.files[i]], [ident, target], float(other_score - own_centre[i]),
                           "quarantine", [photos.files[i]], mates + theirs,
                           f"best cosine to another photo of {ident} {best_own[i]:.3f} < {s.stranger:.3f}; centre "
                           f"of {ident} {own_centre[i]:.3f}, of {target} {other_score:.3f}"
                           + (f"; {votes.count(target)} of its {len(votes)} neighbours above the same-person "
                              f"threshold are {target}" if votes else "")))
    return out


TAIL_MIN_PAIRS = 10_000  # identity pairs needed to read the impostor tail off the data (1,000th largest and more)
TAIL_NEIGHBOURS = 50  # nearest identities per identity searched: the 1,000 closest pairs are among them


def tail_threshold(top_scores: np.ndarray, pairs: int) -> Optional[float]:
    """The largest centre cosine expected among ``pairs`` pairs of *different* people, from the data itself.

    Nearly every pair of identities is two people; the few that are one person sit at the very top. So the
    100th and 1,000th largest centre cosines are impostor pairs, and the top is extrapolated from them assuming
    an exponential tail of -log(1 - cosine) (each factor 10 in rank adds the same amount), which fits the centres
    of both a strong (dlib) and a weak model on LFW (docs/curate.md). Identity centres are far tighter than photo
    pairs, so a photo-pair FAR says little about them: on LFW, FAR 1e-5 let through many times more merges than there
    were (docs/curate.md).
    """
    top = np.sort(np.asarray(top_scores, np.float64))[::-1]
    if pairs < TAIL_MIN_PAIRS or len(top) < 1000:
        return None
    y100, y1000 = -np.log1p(-min(top[99], 1 - 1e-9)), -np.log1p(-min(top[999], 1 - 1e-9))
    return float(-np.expm1(-(y100 + 2 * (y100 - y1000))))


def same_person_findings(photos: Photos, s: CheckSettings, groups: dict[str, np.ndarray],
                         exclude: set[int]) -> list[Finding]:
    """Pairs of identities whose centres are above the merge threshold -- the larger of ``s.merge`` and the
    expected largest impostor (``tail_threshold``) -- each pair once; photos in ``exclude`` (suspects of other
    findings) do not count, nor identities left with fewer than merge_min_photos photos."""
    groups = {k: v for k, v in ((k, np.asarray([i for i in rows if i not in exclude], np.int64))
                                for k, rows in groups.items()) if len(v) >= s.merge_min_photos}
    names, c = centres(photos, groups)
    if len(names) < 2:
        return []
    scores, index = topk_cosine(c, c, min(TAIL_NEIGHBOURS, len(names) - 1), exclude=np.arange(len(names)),
                                normalized=True)
    unique = {(min(a, int(b)), max(a, int(b))): float(v) for a in range(len(names))
              for v, b in zip(scores[a], index[a])}
    tail = tail_threshold(np.fromiter(unique.values(), np.float64), len(names) * (len(names) - 1) // 2)
    merge = max(s.merge, tail or -1.0)
    out = []
    for (a, b), score in sorted(unique.items(), key=lambda item: -item[1]):
        if score < merge:
            break
        small, big = sorted((a, b), key=lambda k: (len(groups[names[k]]), names[k]))
        out.append(Finding("same_person", [], [names[big], names[small]], score, "merge", [],
                           [photos.files[j] for j in groups[names[big]]][:4]
                           + [photos.files[j] for j in groups[names[small]]][:4],
                           f"identity centres at cosine {score:.3f} >= {merge:.3f} ("
                           + ("the largest expected between two people here" if merge == tail else "merge threshold")
                           + f"): probably one person; merge {names[small]} into {names[big]}"))
    return out


def run_checks(photos: Photos, s: CheckSettings, *, progress: bool = False,
               kinds: Optional[set[str]] = None) -> list[Finding]:
    """Every check on ``photos``; findings sorted by kind, then by decreasing score."""
    rows = np.flatnonzero(photos.embedded)
    groups = identity_groups(photos)
    best_own, own_centre = own_fit(photos, groups)
    k = min(s.neighbours, max(len(rows) - 1, 0))
    if k > 0:
        x = photos.embeddings[rows]
        nn_scores, nn_index = topk_cosine(x, x, k, exclude=np.arange(len(rows)), normalized=True, progress=progress)
    else:
        nn_scores, nn_index = np.zeros((len(rows), 0), np.float32), np.zeros((len(rows), 0), np.int64)
    findings = photo_findings(photos, s)
    duplicates = duplicate_findings(photos, s, nn_scores, nn_index, rows, own_centre)
    position = {f: i for i, f in enumerate(photos.files)}
    # a photo already suspected (a copy, not a face) is that finding's, not also a wrong label
    in_duplicates = {position[f] for d in findings + duplicates for f in d.suspects}
    findings += duplicates
    labelled = any(photos.identities)
    if labelled:
        wrong = wrong_label_findings(photos, s, groups, best_own, own_centre, nn_scores, nn_index, rows,
                                     in_duplicates)
        findings += wrong
        findings += same_person_findings(photos, s, groups,
                                         in_duplicates | {position[f] for w in wrong for f in w.suspects})
    if kinds is not None:
        findings = [f for f in findings if f.kind in kinds]
    order = {kind: n for n, kind in enumerate(KINDS)}
    return sorted(findings, key=lambda f: (order[f.kind], -f.score))
