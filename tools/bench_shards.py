"""Benchmark make_shards and ShardDataset against their baselines, measured in the same run; prints ratios.

(a) packing: write_shards vs the floor it cannot beat (list the folder, read and fully decode every file once,
    same number of worker processes, same chunking), with `tar chf` of the same files for scale.
    Goal: <= 1.2x the floor.
(b) reading for training: ShardDataset + DataLoader vs torchvision ImageFolder + DataLoader, both with the
    seed's train transforms (build_train_transform), same workers, batch size and random order; then the
    loading cost alone (decode only; raw bytes warm and cold; opening the dataset). Goal: >= 1.0x, >= 1.5x for
    small images.

Data: a subset of ../shared/data/lfw-devtrain (whole identities in name order, symlinked, never copied) and
synthetic faces (facesiam.synthetic) at 112 px. The contenders run interleaved, --repeats times each,
and the best run counts, both in wall time and in CPU time (this process plus its workers), because the
machine is shared and wall time swings with other jobs. --write-doc replaces the "## Data: make_shards and
ShardDataset" section of docs/benchmarks.md.

    python tools/bench_shards.py --write-doc
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # loader workers use one thread each anyway; keep the parent alike

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from facesiam.augment.transforms import build_train_transform  # noqa: E402
from facesiam.data import ShardDataset, write_shards  # noqa: E402
from facesiam.synthetic import make_synthetic_faces  # noqa: E402
from facesiam.data.folder import list_image_folder  # noqa: E402
from facesiam.data.images import decode_rgb  # noqa: E402

from benchdoc import DOC, LFW, lfw_subset, race, write_section  # tools/ is on sys.path when a tool runs as a script

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Data: make_shards and ShardDataset"
DATE = "2026-11-28"


def _read_and_decode(path: str) -> int:
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.width


def decode_floor(src: Path, workers: int) -> None:
    """What make_shards cannot beat: list the folder, read and fully decode every image once, in `workers`."""
    paths = [str(src / rel) for rel, _ in list_image_folder(src).samples]
    chunksize = max(1, min(64, len(paths) // (workers * 16)))  # as write_shards
    with multiprocessing.get_context().Pool(workers) as pool:
        for _ in pool.imap(_read_and_decode, paths, chunksize=chunksize):
            pass
        pool.close()
        pool.join()  # joined, so the workers' CPU time is counted


def bench_packing(src: Path, work: Path, workers: int, repeats: int) -> dict:
    """Leaves the shards in work/shards. Each make_shards run writes a new folder (no old output to delete)."""
    runs = iter(range(repeats))
    decode_floor(src, workers)  # warm the page cache
    result = race(repeats, {
        "floor": lambda: decode_floor(src, workers),
        "make_shards": lambda: write_shards(src, work / f"shards{next(runs)}", workers=workers, progress=False),
        "tar": lambda: subprocess.run(["tar", "chf", str(work / "plain.tar"), "-C", str(src), "."], check=True),
    })
    (work / "shards0").rename(work / "shards")
    for k in range(1, repeats):
        shutil.rmtree(work / f"shards{k}")
    return result


# ----------------------------------------------------------------------------- (b) reading

def _one_pass(dataset, batch_size: int, workers: int) -> int:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=None if dataset.transform is not None else _decoded_batch)
    return sum(len(labels) for _, labels in loader)


def _decoded_batch(batch):  # no transform: images stay PIL (already decoded); just pass them on
    return [img for img, _ in batch], [label for _, label in batch]


def _evict(paths) -> None:
    """Drop these files from the page cache (POSIX_FADV_DONTNEED: no privileges, touches nothing else)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_files(paths, order) -> None:
    for i in order:
        with open(paths[i], "rb") as f:
            f.read()


def _read_shards(shards: Path, order) -> None:
    ds = ShardDataset(shards)
    for i in order:
        ds.read_bytes(i)


def bench_reading(src: Path, shards: Path, image_size: int, workers: int, batch_size: int, repeats: int) -> dict:
    """name -> {"imagefolder": (wall, cpu), "shards": (wall, cpu)} for the same images."""
    out = {}
    n = len(ShardDataset(shards))
    assert n == len(ImageFolder(src)), "the shards must hold every image of the folder"
    for name, transform in ((f"DataLoader ({workers} workers): decode + train transform",
                             build_train_transform(image_size)),
                            (f"DataLoader ({workers} workers): decode only", None)):
        out[name] = race(repeats, {
            "imagefolder": lambda: _one_pass(ImageFolder(src, transform=transform), batch_size, workers),
            "shards": lambda: _one_pass(ShardDataset(shards, transform=transform), batch_size, workers),
        })

    # the loading cost alone (one process, random order): what sharding saves is the per-file open
    paths = [p for p, _ in ImageFolder(src).samples]
    order = np.random.default_rng(0).permutation(len(paths)).tolist()
    shard_files = sorted(str(p) for p in shards.glob("*.tar"))
    out["read bytes only (1 process)"] = race(repeats, {"imagefolder": lambda: _read_files(paths, order),
                                                        "shards": lambda: _read_shards(shards, order)})
    if hasattr(os, "posix_fadvise"):
        out["read bytes only, cold page cache"] = race(repeats, {
            "imagefolder": lambda: (_evict(paths), _read_files(paths, order)),
            "shards": lambda: (_evict(shard_files), _read_shards(shards, order)),
        })
    out["opening the dataset (walk vs index)"] = race(repeats, {"imagefolder": lambda: ImageFolder(src),
                                                                "shards": lambda: ShardDataset(shards).labels})
    return {name: {**r, "images": n} for name, r in out.items()}


def cost_breakdown(src: Path, shards: Path, image_size: int, repeats: int, count: int = 500) -> dict:
    """Microseconds per image, one process, warm cache: where a training sample's time goes."""
    ds = ShardDataset(shards)
    paths = [str(src / p) for p in ds.paths]
    idx = np.random.default_rng(1).permutation(len(ds))[:count].tolist()
    raw = [ds.read_bytes(i) for i in idx]
    images = [decode_rgb(b) for b in raw]
    transform = build_train_transform(image_size)
    best = race(repeats, {
        "open + read a file": lambda: _read_files(paths, idx),
        "pread from a shard": lambda: [ds.read_bytes(i) for i in idx],
        "decode": lambda: [decode_rgb(b) for b in raw],
        "train transform": lambda: [transform(im) for im in images],
    })
    return {name: wall / len(idx) * 1e6 for name, (wall, _) in best.items()}


# ----------------------------------------------------------------------------- data and report


def report(results: dict, args) -> str:
    lines = [HEADING, "",
             f"{DATE}, `python tools/bench_shards.py --write-doc` ({args.workers} worker processes, batch "
             f"{args.batch_size}, contenders interleaved, best of {args.repeats}) on {platform.machine()} with "
             f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__.split('+')[0]}, Pillow "
             f"{Image.__version__}. Wall times on this shared machine swing by 10-30 % from run to run; CPU "
             f"time (the process and its workers) is steadier. Ratios > 1 favour the shards.", ""]
    for name, r in results.items():
        p, n = r["pack"], r["images"]
        floor_wall, floor_cpu = p["floor"]
        what = (f"LFW-devtrain subset, the first {n} images (whole identities in name order; Huang et al., "
                f"UMass TR 07-49, 2007)" if name == "LFW" else f"Synthetic faces (facesiam.synthetic), {n} images")
        lines += [f"**{what}**: {r['dims']}, {r['mb']:.0f} MB; train transform at {r['size']} px.", "",
                  "| packing | wall s | images/s | wall vs floor | CPU vs floor |", "|---|---:|---:|---:|---:|"]
        rows = (("read + fully decode every file once (floor)", "floor", ""),
                ("make_shards", "make_shards", " (goal <= 1.2x)"),
                ("`tar chf` of the same files, no decoding (scale)", "tar", ""))
        for label, key, goal in rows:
            wall, cpu = p[key]
            bold = "**" if key == "make_shards" else ""
            lines.append(f"| {label} | {wall:.2f} | {n / wall:,.0f} | {bold}{wall / floor_wall:.2f}x{bold}{goal} | "
                         f"{cpu / floor_cpu:.2f}x |")
        lines += ["", "| reading (random order) | ImageFolder images/s | ShardDataset images/s | speed-up, wall | "
                      "speed-up, CPU |", "|---|---:|---:|---:|---:|"]
        for kind, q in r["read"].items():
            (fw, fc), (sw, sc) = q["imagefolder"], q["shards"]
            goal = "" if "train transform" not in kind else (" (goal >= 1.5x)" if r["size"] <= 128 else " (goal >= 1.0x)")
            lines.append(f"| {kind} | {n / fw:,.0f} | {n / sw:,.0f} | **{fw / sw:.2f}x**{goal} | {fc / sc:.2f}x |")
        c = r["costs"]
        ceiling = (c["open + read a file"] + c["decode"] + c["train transform"]) / (
            c["pread from a shard"] + c["decode"] + c["train transform"])
        lines += ["", "Per image, one process, warm cache (µs): " + ", ".join(f"{k} {v:,.0f}" for k, v in c.items())
                  + f". Both loaders decode and transform the same pixels, so the best a loader can gain over "
                  f"ImageFolder here is (open + decode + transform) / (pread + decode + transform) = "
                  f"**{ceiling:.3f}x**.", ""]
    lines += [
        "How to read this. *Packing*: make_shards does the floor's work, then its writer process re-reads each "
        "kept file from the page cache (cheaper than shipping the bytes back from the workers through the pool's "
        "pipe, which added about a quarter to the floor's CPU time) and appends three tar members; on 2 cores that writer competes with "
        "the 2 decoding workers, so wall time shows its cost fully. *Reading*: both "
        "loaders decode the same bytes and run the same transforms, which is over 99 % of the per-image time here "
        "(see the per-image lines), so ShardDataset can only match ImageFolder on a local disk with a warm page "
        "cache; the >= 1.5x goal for small images is above the ceiling computed from the measured costs and is not "
        "reachable on this machine. What shards remove is the per-file cost (the open: ~10 µs warm and ~50-90 µs "
        "cold on this local disk, milliseconds on NFS, Lustre or object-store mounts) and the start-up walk of "
        "millions of files (`read bytes only`, `opening the dataset`), which is where they pay off at scale.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lfw-images", type=int, default=3000, help="LFW subset size (whole identities)")
    parser.add_argument("--synthetic", type=int, nargs=2, default=(200, 10), metavar=("IDS", "PER_ID"),
                        help="synthetic identities and images per identity (112 px)")
    parser.add_argument("--workers", type=int, default=2, help="processes for packing and DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per reading timing")
    parser.add_argument("--pack-repeats", type=int, default=5, help="the same for packing (short runs)")
    parser.add_argument("--write-doc", action="store_true", help=f"update '{HEADING}' in docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        sets = []
        lfw = lfw_subset(tmp / "lfw", args.lfw_images)
        if lfw is not None:
            sets.append(("LFW", lfw, 224))
        else:
            print(f"{LFW} not found: LFW part skipped", file=sys.stderr)
        ids, per_id = args.synthetic
        print(f"generating {ids * per_id} synthetic faces ...", file=sys.stderr)
        synthetic = make_synthetic_faces(tmp / "synthetic", ids, per_id, size=112, workers=args.workers,
                                         progress=False)
        sets.append(("synthetic", synthetic, 112))
        for name, src, size in sets:
            work = tmp / f"work_{name}"
            work.mkdir()
            files = list_image_folder(src).samples
            nbytes = sum((src / rel).stat().st_size for rel, _ in files)
            with Image.open(src / files[0][0]) as im:
                dims = f"{im.width}x{im.height} {im.format}"
            print(f"[{name}] {len(files)} images ({dims}, {nbytes / 1e6:.0f} MB)", file=sys.stderr)
            pack = bench_packing(src, work, args.workers, args.pack_repeats)
            read = bench_reading(src, work / "shards", size, args.workers, args.batch_size, args.repeats)
            costs = cost_breakdown(src, work / "shards", size, args.repeats)
            results[name] = {"images": len(files), "dims": dims, "mb": nbytes / 1e6, "size": size,
                             "pack": pack, "read": read, "costs": costs}

    text = report(results, args)
    print(text)
    if args.write_doc:
        write_section(HEADING, text)
        print(f"wrote {DOC}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
