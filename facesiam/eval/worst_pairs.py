"""The worst mistakes of a model at a threshold: the impostor pairs it scores highest (false accepts) and the genuine
pairs it scores lowest (false rejects), as a contact sheet (REPORT/worst_pairs.png) and a page (worst_pairs.html).

Thumbnails are what the model saw (the aligned crops) and stay in the report folder; nothing is loaded from
elsewhere.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import write_text

THUMB = 96


def worst_pairs(embeddings: np.ndarray, labels: np.ndarray, n: int = 8) -> dict[str, list[tuple[int, int, float]]]:
    """{"false_accepts": the n impostor pairs of highest cosine, "false_rejects": the n genuine pairs of lowest},
    each (i, j, score) with i < j, worst first. Every pair is scored: for a held-out split of a few thousand images."""
    e = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), k=1)
    scores = np.einsum("ij,ij->i", e[i], e[j])
    same = labels[i] == labels[j]
    out = {}
    for key, mask, order in (("false_accepts", ~same, -1), ("false_rejects", same, 1)):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(order * scores[idx], kind="stable")[:n]]
        out[key] = [(int(i[k]), int(j[k]), float(scores[k])) for k in idx]
    return out


def write_worst_pairs(data: dict, out: str | os.PathLike, *, threshold: Optional[float] = None, n: int = 8,
                      image: Optional[Callable[[int], Image.Image]] = None) -> Optional[Path]:
    """REPORT/worst_pairs.png and worst_pairs.html for ``data`` (embed_path's dict: embeddings, labels, paths,
    classes, meta with data and split); ``image(i)``: photo i (default: read from the shards or folder)."""
    out = Path(out)
    labels = np.asarray(data["labels"])
    if len(labels) < 2:
        return None
    pairs = worst_pairs(data["embeddings"], labels, n)
    if image is None:
        image = _reader(data)
    classes = data.get("classes") or []
    name = lambda k: classes[int(labels[k])] if len(classes) > int(labels[k]) else str(labels[k])  # noqa: E731
    rows = [(title, p) for title, key in (("false accepts (different people, highest scores)", "false_accepts"),
                                          ("false rejects (same person, lowest scores)", "false_rejects"))
            for p in pairs[key]]
    sheet = Image.new("RGB", (4 * (THUMB + 8) + 8, max(1, -(-len(rows) // 2)) * (THUMB + 24) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    page = ["<!doctype html><meta charset='utf-8'><title>worst pairs</title><style>body{font-family:system-ui,"
            "sans-serif}td{padding:.3em;text-align:center}</style><h1>The model's worst pairs</h1>",
            f"<p>threshold {'n/a' if threshold is None else f'{threshold:.4f}'}: a pair at or above it is "
            "called the same person. Red: wrong at this threshold.</p><img src='worst_pairs.png'><table>"]
    for k, (title, (a, b, score)) in enumerate(rows):
        x, y = 8 + (k % 2) * 2 * (THUMB + 8), 8 + (k // 2) * (THUMB + 24)
        wrong = threshold is not None and ((score >= threshold) == ("accepts" in title))
        for m, idx in enumerate((a, b)):
            thumb = image(idx).convert("RGB").resize((THUMB, THUMB))
            sheet.paste(thumb, (x + m * (THUMB + 4), y))
        kind = "FA" if "accepts" in title else "FR"
        draw.text((x, y + THUMB + 2), f"{kind} {score:.3f}", fill="red" if wrong else "black")
        page.append(f"<tr><td>{html.escape(title.split(' (')[0])}</td><td>{html.escape(name(a))} / "
                    f"{html.escape(name(b))}</td><td style='color:{'red' if wrong else 'black'}'>{score:.4f}</td></tr>")
    page.append("</table>")
    sheet.save(out / "worst_pairs.png")
    return write_text(out / "worst_pairs.html", "\n".join(page) + "\n")


def _reader(data: dict) -> Callable[[int], Image.Image]:
    meta = data.get("meta") or {}
    root = meta.get("data")
    from ..data.format import METADATA_FILE

    if root and (Path(root) / METADATA_FILE).is_file():
        from ..data import ShardDataset

        ds = ShardDataset(root, meta.get("split") or "val")
        return lambda i: ds[i][0]
    from ..data.images import load_rgb

    return lambda i: load_rgb(Path(root or "") / data["paths"][i])
