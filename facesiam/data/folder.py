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
from typing import Collection, Optional

from torchvision.datasets.folder import IMG_EXTENSIONS  # (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ...)

from ..errors import InputError


@dataclass
class FolderListing:
    """What :func:`list_image_folder` found under ``root``."""

    root: Path
    classes: list[str]  # identity folder names in label order
    samples: list[tuple[str, int]]  # (path relative to root with "/" separators, label), torchvision order
    ignored_files: int = 0  # files inside identity folders without an image extension
    loose_images: list[str] = field(default_factory=list)  # image files directly in root (belong to no identity)
    bad_names: list[str] = field(default_factory=list)  # relative paths not valid UTF-8 (cannot go into JSON)
    excluded: int = 0  # images left out because ``exclude`` named them (e.g. the doctor's suspects)


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


def list_image_folder(root: str | os.PathLike, unlabeled: bool = False,
                      exclude: Optional[Collection[str]] = None) -> FolderListing:
    """List identities and images of an ImageFolder with torchvision's rules (see module docstring).

    ``unlabeled``: ``root`` is a folder of photos without identities (sub-folders are just folders): every image
    anywhere below it is an identity of its own, named by its relative path. Distillation trains on such photos
    (it needs no labels), and the per-class sampler with m_per_class 1 then draws each photo once an epoch.
    ``exclude``: relative paths to leave out (``make_shards --exclude``: the doctor's suspects); identities keep
    their labels even when all their photos are left out, so labels match the folder's.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    listing = _list_unlabeled(root) if unlabeled else _list_labeled(root)
    if exclude:
        exclude = set(exclude)
        kept = [(rel, label) for rel, label in listing.samples if rel not in exclude]
        listing.excluded = len(listing.samples) - len(kept)
        if unlabeled:  # every photo is its own identity: the identities are the photos kept
            listing.classes = [rel for rel, _ in kept]
            kept = [(rel, i) for i, (rel, _) in enumerate(kept)]
        listing.samples = kept
    return listing


def _list_labeled(root: Path) -> FolderListing:
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


def _list_unlabeled(root: Path) -> FolderListing:
    listing = FolderListing(root, [], [])
    base = str(root)
    for dirpath, _, fnames in sorted(os.walk(base, followlinks=True)):
        rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
        for fname in sorted(fnames):
            if not is_image_file(fname):
                listing.ignored_files += 1
                continue
            rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if _is_utf8(rel):
                listing.samples.append((rel, len(listing.classes)))
                listing.classes.append(rel)
            else:
                listing.bad_names.append(printable_name(rel))
    return listing


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit), the default worker count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_destination(src: Path, dst: Path, overwrite: bool, *, marker: str, what: str) -> None:
    """Refuse a destination folder that would corrupt the source or replace something that is not ours.

    ``marker`` is the file that every folder this writer makes holds (dataset.json, alignment.json): with
    ``overwrite`` only such a folder is replaced; ``what`` names it in the messages ("a shard folder").
    """
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if src_r == dst_r or src_r in dst_r.parents:
        raise InputError(f"destination {dst} is inside the source ImageFolder {src}; "
                         f"it would become an identity folder: choose a destination outside {src}")
    if dst_r in src_r.parents:
        raise InputError(f"the source {src} is inside the destination {dst}; choose another destination")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a folder; choose a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"destination {dst} is not empty; choose a new or empty folder, "
                                  f"or pass --overwrite to replace the {what}")
        if not (dst / marker).is_file():
            raise FileExistsError(f"destination {dst} is not empty and holds no {marker}, so it is not {what}; "
                                  f"refusing to replace it even with --overwrite")
