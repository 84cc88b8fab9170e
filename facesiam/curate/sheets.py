"""Contact sheets: REPORT/report.html and report.md, one sheet per finding (or per cluster), the suspect photos
framed in red beside the photos they were compared with, as thumbnails in REPORT/thumbs/.

Thumbnails are small JPEGs of what the model saw (the aligned crop) and stay on the user's disk: the page loads
nothing from anywhere else.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from ..fileio import write_text

MAX_SHEETS_PER_KIND = 300  # the page stays quick to open; findings.jsonl has every finding
THUMBS = "thumbs"


@dataclass
class Sheet:
    """One contact sheet: a title, a line of text, and photos (index into the photo list) with a caption each."""

    title: str
    text: str
    photos: list[tuple[int, str, bool]] = field(default_factory=list)
    """(photo index, caption, is it a suspect)."""


class Thumbnails:
    """Writes each photo's thumbnail once under REPORT/thumbs/ and returns its relative path."""

    def __init__(self, out: Path, thumbnail: Callable[[int], Optional[Image.Image]]):
        self.out, self.thumbnail, self.done = out, thumbnail, {}
        (out / THUMBS).mkdir(parents=True, exist_ok=True)

    def __call__(self, i: int) -> Optional[str]:
        if i not in self.done:
            image = self.thumbnail(i)
            rel = None
            if image is not None:
                rel = f"{THUMBS}/{i}.jpg"
                image.convert("RGB").save(self.out / rel, "JPEG", quality=85)
            self.done[i] = rel
        return self.done[i]


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h2{margin-top:1.6em}
.sheet{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0}.sheet p{margin:.2em 0 .5em}
figure{display:inline-block;margin:0 .4em .4em 0;text-align:center;vertical-align:top;width:104px}
figure img{border:3px solid #eee;width:96px;height:96px;object-fit:cover}figure.suspect img{border-color:#d22}
figcaption{font-size:11px;word-break:break-all}.missing{display:inline-block;width:96px;height:96px;background:#eee}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"""


def write_sheets(out: Path, title: str, summary: Sequence[str], sections: dict[str, list[Sheet]],
                 thumbnail: Callable[[int], Optional[Image.Image]],
                 counts: Optional[dict[str, int]] = None) -> tuple[Path, Path]:
    """report.html and report.md in ``out``: the summary lines and a table of ``counts`` (linking each kind to its
    section), then one section per key of ``sections``."""
    thumbs = Thumbnails(out, thumbnail)
    page = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>",
            f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(line)}</p>" for line in summary]
    md = [f"# {title}", ""] + [f"{line}  " for line in summary] + [""]
    if counts:
        rows = "".join(f"<tr><td><a href='#{html.escape(k)}'>{html.escape(k)}</a></td><td>{v}</td></tr>"
                       for k, v in counts.items())
        page.append(f"<table><tr><th>kind</th><th>findings</th></tr>{rows}</table>")
        md += count_table(Counter(counts)) + [""]
    for name, sheets in sections.items():
        shown = sheets[:MAX_SHEETS_PER_KIND]
        more = f" (the first {len(shown)} shown)" if len(sheets) > len(shown) else ""
        page.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}: {len(sheets)}{more}</h2>")
        md += [f"## {name}: {len(sheets)}{more}", ""]
        for sheet in shown:
            figures, images = [], []
            for i, caption, suspect in sheet.photos:
                rel = thumbs(i)
                img = f"<img src='{rel}' alt=''>" if rel else "<span class='missing'></span>"
                figures.append(f"<figure class='{'suspect' if suspect else ''}'>{img}"
                               f"<figcaption>{html.escape(caption)}</figcaption></figure>")
                if rel:
                    images.append(f"![{caption}{' (suspect)' if suspect else ''}]({rel})")
            page.append(f"<div class='sheet'><b>{html.escape(sheet.title)}</b><p>{html.escape(sheet.text)}</p>"
                        + "".join(figures) + "</div>")
            md += [f"**{sheet.title}** {sheet.text}", "", " ".join(images), ""]
    write_text(out / "report.html", "\n".join(page) + "\n")
    write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.html", out / "report.md"


def count_table(counts: Counter, header: tuple[str, str] = ("kind", "findings")) -> list[str]:
    """A markdown table of counts (for logs and report.md)."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return lines


def caption(path: str) -> str:
    return os.path.basename(path) if "/" not in path else path.split("/", 1)[0] + "/" + os.path.basename(path)
