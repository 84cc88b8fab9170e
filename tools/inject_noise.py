"""Inject known label noise into a copy of an ImageFolder, and score `facesiam doctor` findings against the truth.

    python tools/inject_noise.py inject SRC DST --truth TRUTH.json [--seed 0] [--move 0.03] [--copy 50] [--split 5]
                                        [--non-faces 20] [--identities FILE]
    python tools/inject_noise.py score TRUTH.json FINDINGS.jsonl [--json OUT.json]

inject copies the images of SRC/<identity>/<photo> (SRC is never modified; --identities FILE keeps only the named
folders, e.g. to leave held-out people out) to DST and then, in this order and with disjoint kinds so the truth is
unambiguous: splits --split identities of >= 6 photos in two (the second half goes to <identity>_2), copies --copy
photos byte-identically into another identity's folder, moves a fraction --move of the photos into another
identity's folder, and writes --non-faces pictures (skimage.data, no people) into identity folders. TRUTH.json lists
every change with paths relative to DST.

score reads the doctor's findings (one JSON object a line, paths relative to DST) and prints, per injected kind, the
precision of the findings meant to catch it and the recall of the injected items, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".webp", ".tif", ".tiff"}
# skimage.data pictures that ship inside the wheel (they load offline, no pooch). astronaut and camera are left out:
# they show people, and a face detector would rightly find a face in them.
PICTURES = ("coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse", "hubble_deep_field",
            "immunohistochemistry", "brick", "grass", "gravel", "checkerboard", "clock", "colorwheel", "logo",
            "retina", "microaneurysms", "binary_blobs", "shepp_logan_phantom", "cell")
PHOTO_KINDS = {"unreadable", "no_face", "small_face", "cut_off", "blurred", "low_confidence"}
SIDE = 250


def _unique(folder: Path, name: str, suffix: str, taken: frozenset[str] = frozenset()) -> str:
    """`name`, or with `suffix` (then suffix2, suffix3, ...) before the extension if the folder has it (or had it:
    `taken`)."""
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while (folder / candidate).exists() or candidate in taken:
        candidate = f"{stem}{suffix}{n if n > 1 else ''}{ext}"
        n += 1
    return candidate


def _picture(name: str) -> np.ndarray:
    """A skimage.data picture as uint8 RGB (grey and masks expanded, alpha composited on white)."""
    from skimage import data  # imported here so `score` does not pay for it
    im = np.asarray(data.binary_blobs(rng=0) if name == "binary_blobs" else getattr(data, name)())  # seeded: same DST
    if im.dtype != np.uint8:  # bool masks and float images in [0, 1]
        im = (np.clip(im.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    if im.shape[-1] == 4:
        alpha = im[..., 3:] / 255.0
        im = (im[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return im


def _non_faces(rng: np.random.Generator, count: int) -> list[tuple[Image.Image, str]]:
    """`count` 250x250 RGB non-face pictures: each skimage picture once (centred square), then seeded random crops
    (at least half the short side) rotated by a multiple of 90 degrees, so any count can be served."""
    order = [PICTURES[i] for i in rng.permutation(len(PICTURES))]
    cache: dict[str, np.ndarray] = {}
    out = []
    for i in range(count):
        name = order[i] if i < len(order) else order[rng.integers(len(order))]
        im = cache.setdefault(name, _picture(name))
        h, w = im.shape[:2]
        short = min(h, w)
        if i < len(order):
            side, y, x, k, what = short, (h - short) // 2, (w - short) // 2, 0, name
        else:
            side = int(rng.integers(short // 2, short + 1))
            y, x, k = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1)), int(rng.integers(4))
            what = f"{name} crop {side}px at y={y} x={x}, rotated {90 * k}"
        crop = np.ascontiguousarray(np.rot90(im[y:y + side, x:x + side], k))
        out.append((Image.fromarray(crop).resize((SIDE, SIDE), Image.BILINEAR), what))
    return out


def _apply_noise(root: Path, photos: dict[str, list[str]], args: argparse.Namespace) -> dict:
    """Change the copy at `root` (photos: identity -> sorted file names) and return the truth."""
    rng = np.random.default_rng(args.seed)
    truth: dict = {"moved": [], "copied": [], "split": [], "non_faces": []}

    # 1. split: the second half of a shuffled identity becomes a new identity <identity>_2.
    big = [i for i in sorted(photos) if len(photos[i]) >= 6]
    split = [big[j] for j in rng.choice(len(big), size=min(args.split, len(big)), replace=False)]
    for identity in split:
        files = [photos[identity][j] for j in rng.permutation(len(photos[identity]))]
        n = 2
        while f"{identity}_{n}" in photos or (root / f"{identity}_{n}").exists():
            n += 1
        second = f"{identity}_{n}"
        (root / second).mkdir()
        half = sorted(files[len(files) - len(files) // 2:])
        for f in half:
            os.rename(root / identity / f, root / second / f)
        truth["split"].append({"identity": identity, "second": second, "files": [f"{second}/{f}" for f in half]})
    kept = [i for i in sorted(photos) if i not in split]
    # Copies and moved photos only land in folders of >= 2 original photos, so the owner stays recognisable.
    targets = [i for i in kept if len(photos[i]) >= 2]
    pool = [(i, f) for i in kept for f in photos[i]]

    # 2. copy: byte-identical duplicates under another identity.
    copied = set()
    for j in rng.choice(len(pool), size=min(args.copy, len(pool)), replace=False):
        identity, f = pool[j]
        choices = [t for t in targets if t != identity]
        if not choices:
            continue
        to = choices[rng.integers(len(choices))]
        name = _unique(root / to, f, "_copy")
        shutil.copy2(root / identity / f, root / to / name)
        copied.add((identity, f))
        truth["copied"].append({"original": f"{identity}/{f}", "copy": f"{to}/{name}"})

    # 3. move: wrong labels. Never the last photo of a folder; spread over the targets (one each while they last)
    # so that every target's own photos stay the majority. The photos are chosen first, then their targets.
    wanted = round(args.move * sum(len(v) for v in photos.values()))
    left = {i: len(photos[i]) for i in kept}
    chosen = []
    for j in rng.permutation(len(pool)):
        if len(chosen) == wanted:
            break
        identity, f = pool[j]
        if (identity, f) not in copied and left[identity] > 1:
            chosen.append((identity, f))
            left[identity] -= 1
    received = Counter()
    for identity, f in chosen:
        # Counted after the moves out: a folder left with one own photo would be half foreign after a move in.
        choices = [t for t in targets if t != identity and left[t] >= 2]
        if not choices:
            continue
        least = min(received[t] for t in choices)
        choices = [t for t in choices if received[t] == least]
        to = choices[rng.integers(len(choices))]
        received[to] += 1
        # Nor the name of a photo moved out of `to`: a DST file never stands where SRC had another photo.
        name = _unique(root / to, f, "_moved", frozenset(photos[to]))
        os.rename(root / identity / f, root / to / name)
        truth["moved"].append({"file": f"{to}/{name}", "from": identity, "to": to, "original": f"{identity}/{f}"})

    # 4. non-faces, into any identity folder that was not split.
    for n, (image, what) in enumerate(_non_faces(rng, args.non_faces if kept else 0)):
        to = kept[rng.integers(len(kept))]
        name = _unique(root / to, f"nonface_{n:02d}.jpg", "_")
        image.save(root / to / name, quality=90)
        truth["non_faces"].append({"file": f"{to}/{name}", "what": what})
    return truth


def inject(args: argparse.Namespace) -> dict:
    src, dst, truth_path = Path(args.src), Path(args.dst), Path(args.truth)
    if not src.is_dir():
        raise SystemExit(f"inject_noise: {src} is not a folder")
    if dst.exists():
        raise SystemExit(f"inject_noise: {dst} exists; give a new folder (DST is created, never overwritten)")
    names = sorted(p.name for p in src.iterdir() if p.is_dir())
    if args.identities:
        wanted = [line.strip() for line in Path(args.identities).read_text().splitlines() if line.strip()]
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise SystemExit(f"inject_noise: {len(missing)} identities of {args.identities} not in {src}: "
                             f"{', '.join(missing[:5])}")
        names = sorted(set(wanted))
    photos = {i: sorted(p.name for p in (src / i).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
              for i in names}
    photos = {i: files for i, files in photos.items() if files}
    before = sum(len(v) for v in photos.values())
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Built beside DST and renamed at the end: a failed run leaves neither DST nor half a copy.
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        for identity, files in photos.items():
            (tmp / identity).mkdir()
            for f in files:
                shutil.copy2(src / identity / f, tmp / identity / f)
        changes = _apply_noise(tmp, photos, args)
        after = sum(1 for p in tmp.rglob("*") if p.is_file())
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    truth = {"seed": args.seed, "source": str(src.resolve()), "dst": str(dst.resolve()), "photos": after, **changes}
    part = truth_path.with_name(truth_path.name + ".tmp")
    part.write_text(json.dumps(truth, indent=1))
    os.replace(part, truth_path)
    split_files = sum(len(s["files"]) for s in truth["split"])
    print(f"split: {len(truth['split'])} identities ({split_files} photos to new folders)")
    print(f"copied: {len(truth['copied'])} photos")
    print(f"moved: {len(truth['moved'])} of {before} photos ({len(truth['moved']) / max(before, 1):.1%})")
    print(f"non_faces: {len(truth['non_faces'])} images; DST {dst} holds {after} photos, truth in {truth_path}")
    return truth


def score(args: argparse.Namespace) -> dict:
    truth = json.loads(Path(args.truth).read_text())
    findings = [json.loads(line) for line in Path(args.findings).read_text().splitlines() if line.strip()]
    for f in findings:  # paths are relative to DST; accept Windows separators
        for key in ("files", "suspects"):
            f[key] = {p.replace("\\", "/") for p in f.get(key) or []}
        f["identities"] = set(f.get("identities") or [])
    in_suspects: Callable[[dict, object], bool] = lambda f, item: item in f["suspects"]
    # (row, injected items, finding kinds scored for precision, kinds that count for recall, does f find item)
    rows = [
        ("moved", [m["file"] for m in truth["moved"]], {"wrong_label"}, {"wrong_label"}, in_suspects),
        # a copy is found when a duplicate finding holds both files and names the copy (not the original) as the
        # one to quarantine; near duplicates are a kind of their own (injected copies are byte-identical)
        ("copied", [(c["original"], c["copy"]) for c in truth["copied"]], {"duplicate"},
         {"duplicate", "near_duplicate"}, lambda f, pair: set(pair) <= f["files"] and pair[1] in f["suspects"]),
        ("split", [(s["identity"], s["second"]) for s in truth["split"]], {"same_person"}, {"same_person"},
         lambda f, pair: set(pair) <= f["identities"]),
        ("non_faces", [n["file"] for n in truth["non_faces"]], {"no_face"}, PHOTO_KINDS, in_suspects),
    ]
    result: dict = {"rows": {}}
    print("| injected kind | injected | findings | true findings | precision | recall | found by |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, items, precision_kinds, recall_kinds, finds in rows:
        scored = [f for f in findings if f["kind"] in precision_kinds]
        true = sum(any(finds(f, item) for item in items) for f in scored)
        found_by = Counter()
        found = 0
        for item in items:
            kinds = {f["kind"] for f in findings if f["kind"] in recall_kinds and finds(f, item)}
            found += bool(kinds)
            found_by.update(kinds)
        row = {"injected": len(items), "findings": len(scored), "true_findings": true,
               "precision": true / len(scored) if scored else None, "recall": found / len(items) if items else None,
               "found": found, "found_by": dict(sorted(found_by.items()))}
        result["rows"][name] = row
        cells = [f"{v:.3f}" if v is not None else "-" for v in (row["precision"], row["recall"])]
        by = ", ".join(f"{k} {v}" for k, v in row["found_by"].items()) or "-"
        print(f"| {name} | {len(items)} | {len(scored)} | {true} | {cells[0]} | {cells[1]} | {by} |")
    scored_kinds = set().union(*(r[2] for r in rows))
    result["unscored"] = dict(sorted(Counter(f["kind"] for f in findings if f["kind"] not in scored_kinds).items()))
    print("\nfindings of kinds not scored for precision: "
          + (", ".join(f"{k} {v}" for k, v in result["unscored"].items()) or "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inject", help="copy SRC to DST with known noise, and write the truth")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--truth", required=True, metavar="TRUTH.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--move", type=float, default=0.03, help="fraction of the photos moved to a wrong identity")
    p.add_argument("--copy", type=int, default=50, help="photos copied into another identity's folder")
    p.add_argument("--split", type=int, default=5, help="identities (of >= 6 photos) split in two folders")
    p.add_argument("--non-faces", type=int, default=20, help="non-face pictures written into identity folders")
    p.add_argument("--identities", metavar="FILE", help="copy only these identity folders (one name a line)")
    p = sub.add_parser("score", help="precision and recall of doctor findings against TRUTH.json")
    p.add_argument("truth", metavar="TRUTH.json")
    p.add_argument("findings", metavar="FINDINGS.jsonl")
    p.add_argument("--json", metavar="OUT.json", help="also write the scores here")
    args = parser.parse_args(argv)
    return inject(args) if args.command == "inject" else score(args)


if __name__ == "__main__":
    main()
