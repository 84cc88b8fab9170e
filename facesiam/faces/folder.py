"""The folder job: a whole ImageFolder of raw photos -> an aligned ImageFolder (PNG crops) + alignment.json,
in worker processes (CPU) or one batched detector (GPU); and ``align_shards`` (make_shards --align).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Sequence

from PIL import Image

from ..data.folder import available_cpus, check_destination, list_image_folder, printable_name
from ..data.format import METADATA_FILE
from ..data.images import BadImage, load_rgb
from ..data.writer import write_shards
from ..errors import InputError
from ..fileio import staged_directory, write_text
from .aligner import DEFAULT_DETECTOR, AlignResult, FaceAligner, alignment_info
from .record import ALIGNMENT_FILE, ALIGNMENT_FORMAT, ALIGNMENT_FORMAT_VERSION, count_results, record_text
from .template import TEMPLATE_SIZE

# Crops are PNG: lossless, so a later make_shards stores their bytes untouched and the pixels are exactly what
# the warp made (a JPEG would add a second lossy generation on top of the source's). Costs ~4x the bytes of JPEG q95
# (LFW crops: 20 kB vs 5 kB).
OUTPUT_EXT = ".png"
PNG_COMPRESS_LEVEL = 1  # zlib level 1: 1.2 ms a crop instead of 4.2 ms at PIL's default 6, files ~2 % larger


def output_paths(relpaths: Sequence[str]) -> list[str]:
    """Each source's crop path: its relative path with the extension replaced by .png.

    When two sources would share one (a.jpg and a.png), both keep their whole name plus .png (a.jpg.png).
    """
    first = [os.path.splitext(rel)[0] + OUTPUT_EXT for rel in relpaths]
    counts: dict[str, int] = {}
    for out in first:
        counts[out] = counts.get(out, 0) + 1
    outs = [rel + OUTPUT_EXT if counts[out] > 1 else out for rel, out in zip(relpaths, first)]
    used: set[str] = set()
    for i, out in enumerate(outs):  # a source literally named a.jpg.png as well: number the rest
        n, unique = 1, out
        while unique in used:
            unique, n = f"{os.path.splitext(out)[0]}.{n}{OUTPUT_EXT}", n + 1
        used.add(unique)
        outs[i] = unique
    return outs


@dataclass
class _Job:
    """Aligns chunks of files into a folder; one per worker process (each with its own detector)."""

    src: Path
    out: Path
    options: dict[str, Any]
    threads: Optional[int] = None  # torch threads in a worker process
    aligner: Optional[FaceAligner] = field(default=None, repr=False)

    def start(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # N processes x 1 thread beats 1 process x N threads (MTCNN)
        self.aligner = FaceAligner(**self.options)

    def load(self, chunk: Sequence[tuple[str, str]]) -> list[Any]:
        """Each file as an RGB image, or the reason it cannot be read (never raises for one bad file)."""
        loaded: list[Any] = []
        for rel, _ in chunk:
            path = self.src / rel
            try:
                loaded.append(load_rgb(path))
            except BadImage as e:
                loaded.append(str(e).removeprefix(f"{path}: "))
            except OSError as e:  # vanished, unreadable
                loaded.append(f"cannot read: {type(e).__name__}: {e.strerror or e}")
            except Exception as e:  # anything else PIL trips over must not stop a long run either
                loaded.append(f"cannot decode: {type(e).__name__}: {e}")
        return loaded

    def align(self, chunk: Sequence[tuple[str, str]], loaded: Optional[list[Any]] = None) -> list[dict[str, Any]]:
        """Align and save one chunk; one record per file, in order."""
        loaded = self.load(chunk) if loaded is None else loaded
        images = [x for x in loaded if isinstance(x, Image.Image)]
        try:
            results = iter(self.aligner.align_batch(images))
        except Exception:  # one odd image must not cost the chunk: redo one by one, recording the failure
            results = iter([self._align_one(img) for img in images])
        records = []
        for (rel, out), item in zip(chunk, loaded):
            result = (next(results) if isinstance(item, Image.Image)
                      else AlignResult(None, "skipped", item, skip="unreadable"))
            record = {"path": rel, "output": None, **result.record()}
            if result.image is not None:
                target = self.out / out
                target.parent.mkdir(parents=True, exist_ok=True)
                # no per-file atomicity needed: the whole folder is staged
                result.image.save(target, "PNG", compress_level=PNG_COMPRESS_LEVEL)
                record["output"] = out
            records.append(record)
        return records

    def _align_one(self, image: Image.Image) -> AlignResult:
        try:
            return self.aligner.align(image)
        except Exception as e:
            return AlignResult(None, "skipped", f"cannot align: {type(e).__name__}: {e}", skip="error")


_worker_job: Optional[_Job] = None  # the job of this worker process


def _worker_start(job: _Job) -> None:
    global _worker_job
    _worker_job = job
    job.start()


def _worker_align(chunk: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    return _worker_job.align(chunk)


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, *, size: int = TEMPLATE_SIZE,
                 workers: Optional[int] = None, device: str = "cpu", on_no_face: str = "skip",
                 multi: str = "largest", min_face_size: int = 20, batch_size: Optional[int] = None,
                 detector: str = DEFAULT_DETECTOR, overwrite: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None, unlabeled: bool = False,
                 exclude: Optional[Collection[str]] = None) -> dict[str, Any]:
    """Align every image of the ImageFolder ``src`` into the ImageFolder ``dst``; return alignment.json's contents.

    Each kept face goes to its source's relative path with a .png extension (see OUTPUT_EXT). ``dst`` is built
    in a hidden folder beside it and appears complete or not at all; ``dst/alignment.json`` holds
    alignment_info, counts and one record per source image (path, output, status, reason, box, score,
    landmarks, faces). Unreadable files are skipped with their reason; a run never stops on one file.

    workers: on CPU, processes with one detector and one torch thread each (default: all usable CPUs; <= 1 runs
        here); on a GPU, one batched detector here and ``workers`` threads decoding the next batch.
    detector: a registered detector (faces/detectors.py: DETECTORS).
    progress: called after each batch with (images just done, images in all), e.g. to drive a tqdm bar.
    overwrite: replace a non-empty dst that holds a previous alignment.json (never anything else).
    unlabeled: ``src`` is a folder of photos without identities (any layout; data/folder.list_image_folder).
    exclude: source paths (relative to ``src``) to leave out, e.g. the doctor's suspects.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=ALIGNMENT_FILE, what="an aligned folder")
    options = {"size": size, "device": device, "min_face_size": min_face_size, "multi": multi,
               "on_no_face": on_no_face, "batch_size": batch_size, "detector": detector}
    probe = FaceAligner(**options)  # checks the options and the install before any work
    listing = list_image_folder(src, unlabeled=unlabeled, exclude=exclude)
    if not listing.classes:
        raise InputError(f"source {src} has no image files" if unlabeled else
                         f"source {src} has no identity sub-folders; expected SRC/<identity>/<image> "
                         "(photos without identities: --unlabeled)")
    rels = [rel for rel, _ in listing.samples]
    files = list(zip(rels, output_paths(rels)))
    chunks = [files[i:i + probe.batch_size] for i in range(0, len(files), probe.batch_size)]
    workers = available_cpus() if workers is None else max(1, workers)
    records: list[dict[str, Any]] = [{"path": printable_name(p), "output": None, "status": "skipped",
                                      "reason": "file name is not valid UTF-8; rename the file", "box": None,
                                      "score": None, "landmarks": None, "faces": 0, "skip": "unreadable"}
                                     for p in listing.bad_names]
    with staged_directory(dst, last=ALIGNMENT_FILE) as tmp:
        for chunk, done in _aligned_chunks(src, tmp, options, probe, chunks, workers):
            records += done
            if progress is not None:
                progress(len(chunk), len(files))
        kept = {r["output"].split("/", 1)[0] for r in records if r["output"]}
        meta = {
            "format": ALIGNMENT_FORMAT,
            "version": ALIGNMENT_FORMAT_VERSION,
            "source": str(src.resolve()),
            "alignment": alignment_info(probe),
            "counts": count_results(records),
            "seconds": round(time.perf_counter() - start, 3),
            "classes": [printable_name(c) for c in listing.classes],
            "identities_without_images": [] if unlabeled else [printable_name(c) for c in listing.classes
                                                                if c not in kept],
            "unlabeled": unlabeled,
            "ignored_files": listing.ignored_files,
            "loose_images": listing.loose_images,
            "images": records,
        }
        write_text(tmp / ALIGNMENT_FILE, record_text(meta))
    return meta


def _aligned_chunks(src: Path, out: Path, options: dict[str, Any], probe: FaceAligner,
                    chunks: list[list[tuple[str, str]]], workers: int):
    """Yield (chunk, its records) in order: here (GPU, one worker, one chunk) or in a pool of worker processes."""
    on_gpu = str(options["device"]).startswith("cuda")
    if on_gpu or workers <= 1 or len(chunks) <= 1:
        job = _Job(src, out, options, aligner=probe)
        # decode the next chunk in threads while this one is aligned (PIL releases the GIL while decoding)
        with concurrent.futures.ThreadPoolExecutor(max(1, workers if on_gpu else 1)) as pool:
            pending = pool.submit(job.load, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                loaded = pending.result()
                pending = pool.submit(job.load, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield chunk, job.align(chunk, loaded)
        return
    job = _Job(src, out, options, threads=1)
    with multiprocessing.get_context().Pool(min(workers, len(chunks)), _worker_start, (job,)) as pool:
        yield from zip(chunks, pool.imap(_worker_align, chunks))  # ordered: stable json
        pool.close()
        pool.join()  # let the workers exit cleanly (leaving the block would kill them)


def align_shards(src: str | os.PathLike, dst: str | os.PathLike, *, size: int = TEMPLATE_SIZE,
                 workers: Optional[int] = None, device: str = "cpu", on_no_face: str = "skip",
                 multi: str = "largest", min_face_size: int = 20, batch_size: Optional[int] = None,
                 detector: str = DEFAULT_DETECTOR, overwrite: bool = False,
                 align_progress: Optional[Callable[[int, int], None]] = None, **shard_options: Any) -> dict[str, Any]:
    """``make_shards --align``: align the raw ImageFolder ``src`` and pack the crops into shards at ``dst``.

    The crops go to a hidden folder beside ``dst`` (deleted afterwards) and are packed by write_shards, whose
    dataset.json then records the alignment (detector, template, size) and every image's result. Returns the
    dataset.json contents. ``shard_options`` are write_shards' (val_identities, seed, resize, progress, ...);
    ``align_progress`` is align_folder's ``progress``.
    """
    src, dst = Path(src), Path(dst)
    if shard_options.get("center_crop"):
        raise InputError("--center-crop cannot go with --align: aligned crops are already centred on the face")
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=METADATA_FILE, what="a shard folder")  # before the long part
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.resolve().name}.aligning-", dir=parent) as tmp:
        faces = Path(tmp) / "faces"
        record = align_folder(src, faces, size=size, workers=workers, device=device, on_no_face=on_no_face,
                              multi=multi, min_face_size=min_face_size, batch_size=batch_size, detector=detector,
                              progress=align_progress, unlabeled=shard_options.get("unlabeled", False),
                              exclude=shard_options.pop("exclude", None))
        return write_shards(faces, dst, workers=workers, overwrite=overwrite, source=str(src.resolve()),
                            alignment=record, **shard_options)
