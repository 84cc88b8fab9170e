"""Listing an ImageFolder (one sub-folder per identity) exactly as torchvision's ImageFolder does.

Labels and order must match ``torchvision.datasets.ImageFolder`` so that shards, raw folders and anyone's
torchvision code agree on what label 17 means: identities are the sub-folders sorted by name (label =
position), images are found recursively with ``sorted(os.walk(..., followlinks=True))`` and sorted file
names, and only torchvision's image extensions count. Written here rather than calling
``torchvision.datasets.folder.make_dataset`` because one walk must also collect what torchvision drops
silently (non-image files, loose images, unusable names), which the shard writer reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS  # (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ...)


@dataclass
class FolderListing:
    """What :func:`list_image_folder` found under ``root``."""

    root: Path
    classes: list[str]  # identity folder names in label order
    samples: list[tuple[str, int]]  # (path relative to root with "/" separators, label), torchvision order
    ignored_files: int = 0  # files inside identity folders without an image extension
    loose_images: list[str] = field(default_factory=list)  # image files directly in root (belong to no identity)
    bad_names: list[str] = field(default_factory=list)  # relative paths not valid UTF-8 (cannot go into JSON)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # names with undecodable bytes hold lone surrogates (os.fsdecode)
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """``name`` itself, or with undecodable bytes shown as \\xNN (for names that are not valid UTF-8)."""
    return name if _is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


def list_image_folder(root: str | os.PathLike) -> FolderListing:
    """List identities and images of an ImageFolder with torchvision's rules (see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    with os.scandir(root) as it:
        entries = list(it)
    classes = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(e.name for e in entries if not e.is_dir() and is_image_file(e.name))
    listing = FolderListing(root, classes, [], loose_images=[printable_name(n) for n in loose])
    base = str(root)
    for label, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(os.path.join(base, name), followlinks=True)):
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            for fname in sorted(fnames):
                if not is_image_file(fname):
                    listing.ignored_files += 1
                    continue
                rel = f"{rel_dir}/{fname}"
                if _is_utf8(rel):
                    listing.samples.append((rel, label))
                else:
                    listing.bad_names.append(printable_name(rel))
    return listing
