"""Benchmark face alignment (align_folder) against the detector's forward passes alone; prints the ratio.

(a) align_folder(SRC, DST, workers=2) on CPU -- list, decode, detect, choose, warp, PNG-encode and write every
    image, alignment.json, the worker pool's start -- against the floor it cannot beat: MTCNN.detect on the same
    images, already decoded, in a pool of as many single-thread worker processes with the same batches.
    Goal: <= 1.3x the floor.
(b) MTCNN's batch size on one CPU thread (same-sized images in one call vs one at a time): why CPU_BATCH is 16.

Data: the first --images images of ../shared/data/lfw-devtrain (symlinked, never copied), or, when it is absent,
as many 250x250 canvases of scikit-image's astronaut face at seeded scales, rotations and places. Contenders
run interleaved, --repeats times, and the best run counts (wall and CPU time of this process plus its joined
workers), because the machine is shared. Prints a markdown section for docs/benchmarks.md.

    python tools/bench_align.py
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from facesiam.faces.aligner import SKIP_KINDS  # noqa: E402
from facesiam.faces.detectors import CPU_BATCH, load_mtcnn, package_version  # noqa: E402
from facesiam.faces.folder import align_folder  # noqa: E402
from facesiam.data.folder import list_image_folder  # noqa: E402
from facesiam.data.images import load_rgb  # noqa: E402

from benchdoc import LFW, race, write_section  # tools/ is on sys.path when a tool runs as a script

HEADING = "## Data: align_faces (MTCNN detection + 5-point alignment)"
DATE = "2026-12-02"


# ----------------------------------------------------------------------------- data

def lfw_subset(target: Path, images: int) -> Path | None:
    """The first `images` images of LFW-devtrain in ImageFolder order, as symlinks."""
    if not LFW.is_dir():
        return None
    for rel, _ in list_image_folder(LFW).samples[:images]:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).symlink_to(LFW / rel)
    return target


def synthetic_subset(target: Path, images: int) -> Path:
    """250x250 JPEGs of the astronaut's face at seeded scales (0.5-1.2x), rotations (+-30 deg) and places."""
    import skimage.data
    from skimage.transform import SimilarityTransform, warp

    face = skimage.data.astronaut()[10:230, 130:320] / 255.0
    rng = np.random.default_rng(0)
    for i in range(images):
        scale, degrees = rng.uniform(0.5, 1.2), rng.uniform(-30, 30)
        centre = rng.uniform(100, 150, 2)
        p = (SimilarityTransform(translation=(-94.5, -109.5))
             + SimilarityTransform(scale=scale, rotation=np.radians(degrees)) + SimilarityTransform(translation=centre))
        pixels = warp(face, p.inverse, output_shape=(250, 250), order=1, cval=rng.uniform(0.2, 0.8))
        path = target / f"id{i // 10:03d}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path, quality=90)
    return target


# ----------------------------------------------------------------------------- the floor

_images: list[Image.Image] = []  # decoded in the parent before the fork: the workers inherit them for free
_mtcnn = None


def _floor_start() -> None:
    global _mtcnn
    torch.set_num_threads(1)
    _mtcnn = load_mtcnn("cpu", 20)


def _floor_detect(indices: list[int]) -> int:
    boxes, _, _ = _mtcnn.detect([_images[i] for i in indices], landmarks=True)
    return len(boxes)


def detect_floor(workers: int, batch: int) -> None:
    """MTCNN.detect alone over the decoded images, same worker count and batches as align_folder."""
    chunks = [list(range(i, min(i + batch, len(_images)))) for i in range(0, len(_images), batch)]
    with multiprocessing.get_context("fork").Pool(workers, _floor_start) as pool:
        for _ in pool.imap(_floor_detect, chunks):
            pass
        pool.close()
        pool.join()  # joined, so the workers' CPU time is counted


def batch_sizes(images: list[Image.Image], sizes: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Seconds per image of MTCNN.detect in this process (one thread) by batch size."""
    torch.set_num_threads(1)
    mtcnn = load_mtcnn("cpu", 20)

    def run(size: int) -> None:
        for i in range(0, len(images), size):
            mtcnn.detect(images[i:i + size], landmarks=True)

    best = race(repeats, {str(s): (lambda s=s: run(s)) for s in sizes})
    return {int(s): wall / len(images) for s, (wall, _) in best.items()}


# ----------------------------------------------------------------------------- report

def report(what: str, n: int, dims: str, result: dict, counts: dict, per_image: dict[int, float],
           png_kb: float, jpg_kb: float, args) -> str:
    floor_wall, floor_cpu = result["floor"]
    lines = [HEADING, "",
             f"{DATE}, `python tools/bench_align.py --write-doc` ({args.workers} worker processes with one torch thread each, "
             f"batches of {CPU_BATCH}, contenders interleaved, best of {args.repeats}) on "
             f"{platform.machine()} with {os.cpu_count()} cores shared with other jobs, torch "
             f"{torch.__version__.split('+')[0]}, facenet-pytorch {package_version('facenet-pytorch')}, "
             f"numpy {np.__version__}. CPU only (no GPU in this run). Wall times on this shared machine swing by "
             f"tens of per cent from run to run (other jobs share the 2 cores); CPU time (this process and its "
             f"workers) is steadier.", "",
             f"**{what}**: {n} images, {dims}.", "",
             "| | wall s | images/s | wall vs floor | CPU vs floor |", "|---|---:|---:|---:|---:|"]
    for label, key, goal in (("MTCNN.detect alone on decoded images (floor)", "floor", ""),
                             ("align_folder: list, decode, detect, warp, PNG, alignment.json", "align",
                              " (goal <= 1.3x)")):
        wall, cpu = result[key]
        bold = "**" if key == "align" else ""
        lines.append(f"| {label} | {wall:.2f} | {n / wall:,.1f} | {bold}{wall / floor_wall:.2f}x{bold}{goal} | "
                     f"{cpu / floor_cpu:.2f}x |")
    c = counts
    why = ", ".join(f"{c['skipped_' + kind]} {kind.replace('_', ' ')}" for kind in SKIP_KINDS)
    lines += ["", f"Detection on these images: {c['aligned']} aligned, {c['skipped']} skipped "
                  f"({why}), {c['multi_face']} with "
                  f"several faces, {c['center']} centre-cropped. Crops: PNG {png_kb:.1f} kB on average (the same "
                  f"crops as JPEG quality 95: {jpg_kb:.1f} kB).", "",
              "| MTCNN batch (same-sized images, one process, one thread) | " + " | ".join(str(s) for s in per_image)
              + " |", "|---|" + "---:|" * len(per_image),
              "| ms per image | " + " | ".join(f"{v * 1000:.1f}" for v in per_image.values()) + " |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images (the first N of LFW-devtrain)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of both contenders")
    parser.add_argument("--repeats", type=int, default=4, help="best of this many interleaved runs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="MTCNN batch sizes to time in one process (on the first 64 images)")
    parser.add_argument("--write-doc", action="store_true", help="replace this section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp:
        tmp = Path(tmp)
        src = lfw_subset(tmp / "lfw", args.images)
        if src is not None:
            what = (f"LFW-devtrain, the first {args.images} images in ImageFolder order (Huang et al., UMass TR "
                    f"07-49, 2007)")
        else:
            print(f"{LFW} not found: using synthetic astronaut canvases", file=sys.stderr)
            src = synthetic_subset(tmp / "synthetic", args.images)
            what = "Synthetic: scikit-image's astronaut face at seeded scales 0.5-1.2x and rotations +-30 deg"
        files = [src / rel for rel, _ in list_image_folder(src).samples]
        _images[:] = [load_rgb(p) for p in files]
        sizes = sorted({im.size for im in _images})
        dims = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        print(f"{len(files)} images ({dims}); racing align_folder against the detector alone ...", file=sys.stderr)
        runs = iter(range(args.repeats))
        result = race(args.repeats, {
            "floor": lambda: detect_floor(args.workers, CPU_BATCH),
            "align": lambda: align_folder(src, tmp / f"out{next(runs)}", workers=args.workers),
        })
        meta = align_folder(src, tmp / "counts", workers=args.workers)
        crops = [tmp / "counts" / r["output"] for r in meta["images"] if r["output"]]
        png_kb = float(np.mean([p.stat().st_size for p in crops])) / 1e3
        jpg = []
        for p in crops:
            buf = io.BytesIO()
            Image.open(p).save(buf, "JPEG", quality=95)
            jpg.append(len(buf.getvalue()))
        for k in range(args.repeats):
            shutil.rmtree(tmp / f"out{k}", ignore_errors=True)
        print("timing MTCNN batch sizes ...", file=sys.stderr)
        per_image = batch_sizes(_images[:64], tuple(args.batch_sizes), 2)

    text = report(what, len(files), dims, result, meta["counts"], per_image, png_kb, float(np.mean(jpg)) / 1e3, args)
    print(text)
    if args.write_doc:
        write_section(HEADING, text)
    (floor_wall, floor_cpu), (wall, cpu) = result["floor"], result["align"]
    print(f"ratio align_folder / detector floor: wall {wall / floor_wall:.2f}x, CPU {cpu / floor_cpu:.2f}x "
          f"(goal <= 1.3x)", file=sys.stderr)
    return {"result": result, "counts": meta["counts"], "batch": per_image}


if __name__ == "__main__":
    main()
