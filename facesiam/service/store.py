"""The service's gallery: a facesiam.eval.gallery.Gallery in memory, saved whole after every change.

Writes (enrol, delete) run one at a time on the model thread; each builds the changed gallery, saves it into a
staging folder and swaps it in (fileio.staged_directory), and only then replaces the one searches use. A kill -9
at any point leaves the folder as it was before or after the change: Gallery.load undoes a swap cut short.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..fileio import recover_directory
from ..eval.gallery import META_FILE, Gallery


class GalleryStore:
    """Enrolled identities for the service; ``directory=None`` keeps them in memory only."""

    def __init__(self, directory: Optional[str | Path], dim: int, *, model: str = ""):
        self.directory = Path(directory) if directory is not None else None
        self.dim = dim
        self.model = model
        self.gallery: Optional[Gallery] = None
        self._write = threading.Lock()
        if self.directory is None:
            return
        recover_directory(self.directory, marker=META_FILE, clean_staging=True)  # a save cut short by a kill
        if (self.directory / META_FILE).is_file():
            self.gallery = Gallery.load(self.directory)
            if self.gallery.index.d != dim:
                raise InputError(f"gallery {self.directory} holds {self.gallery.index.d}-d embeddings but the model "
                                 f"makes {dim}-d ones; serve it with the model it was built with "
                                 f"({self.gallery.meta.get('checkpoint', 'see gallery.json')}) or use a new --gallery")
        elif self.directory.exists() and (not self.directory.is_dir() or any(self.directory.iterdir())):
            raise InputError(f"--gallery {self.directory} exists but is not a gallery (no {META_FILE}); pass a "
                             "gallery folder, or a new or empty one to start a gallery there")

    @property
    def size(self) -> int:
        return self.gallery.size if self.gallery is not None else 0

    def identities(self) -> dict[str, int]:
        """Enrolled names -> number of images, in enrolment order."""
        g = self.gallery
        if g is None or not g.size:
            return {}
        counts = np.bincount(g.identity, minlength=len(g.names))
        return {name: int(c) for name, c in zip(g.names, counts) if c}

    def search(self, embeddings: np.ndarray, k: int) -> list[list[dict]]:
        g = self.gallery  # one reference: a concurrent write swaps in a new object, never edits this one
        if g is None or not g.size:
            return [[] for _ in range(len(embeddings))]
        return g.search(embeddings, k=k)

    def enroll(self, identity: str, embeddings: np.ndarray, sources: Sequence[str]) -> int:
        """Add one identity's embeddings; returns its image count after the change."""
        with self._write:
            paths = [f"enrolled: {s}" if s else "enrolled" for s in sources]
            if self.gallery is None or not self.gallery.size:
                new = Gallery.build(embeddings, [identity] * len(embeddings), paths,
                                    meta={"checkpoint": self.model, "source": "facesiam serve"})
            else:
                new = self.gallery.copy()
                new.add(embeddings, [identity] * len(embeddings), paths)
            self._commit(new)
            return self.identities().get(identity, 0)

    def delete(self, identity: str) -> int:
        """Remove an identity; returns how many images it had (0: not enrolled, nothing written)."""
        with self._write:
            if self.gallery is None:
                return 0
            new = self.gallery.copy()
            removed = new.remove(identity)
            if removed:
                self._commit(new)
            return removed

    def _commit(self, new: Gallery) -> None:
        if self.directory is not None:
            new.save(self.directory)  # staged and swapped in: the folder is whole before and after
        self.gallery = new
