"""Benchmark insightface RecordIO support (facesiam/data/recordio.py) on a synthetic .rec of 112 px JPEG faces.

    flock /tmp/locks/heavy python tools/bench_rec.py [--images 100000] [--write-doc]

(a) make_shards REC/ SHARDS/ (bytes copied as stored) vs a plain copy of the same bytes (train.rec copied and
    fsynced, as the shard writer fsyncs its shards): goal >= 0.5x the copy's speed; peak memory of the conversion
    at 1/4 and all of the images (flat in data size: the index is ~40 bytes an image);
(b) the training loader (setup.build_data: per-class sampler, 2 workers, the default fused train transform at
    112 px) reading the .rec directly vs reading the shards made from it, same run, interleaved: goal >= 0.9x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchdoc import REPO, race, write_section  # noqa: E402

HEADING = "## RecordIO: insightface .rec to shards, and training straight from a .rec (issue 38)"


def synthetic_rec(folder: Path, images: int, per_identity: int, seed: int = 0, distinct: int = 4000) -> dict:
    """A header-0 .rec of ``images`` 112 px JPEGs, ``per_identity`` per identity: ``distinct`` smooth random
    pictures (a 14 px random image blown up, plus fine noise: realistic 4-6 kB JPEGs) used in turn, so drawing
    100,000 takes seconds; the records are as many and as large as distinct ones (file offsets, not contents, are
    what the readers see)."""
    from PIL import Image

    from facesiam.data.recordio import write_rec

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(min(distinct, images)):
        small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
        big = np.asarray(small.resize((112, 112), Image.Resampling.BILINEAR), np.int16)
        big = (big + rng.integers(-12, 13, big.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    samples = ((pool[k % len(pool)], k // per_identity) for k in range(images))
    return write_rec(folder, samples, num_classes=-(-images // per_identity), progress=True, total=images)


def subset_rec(src: Path, dst: Path, images: int) -> None:
    """The first ``images`` images of ``src`` (whole records, as stored) as their own .rec."""
    from facesiam.data.recordio import RecordFile, write_rec

    rec = RecordFile(src)
    keys, labels = rec.image_keys[:images], rec.labels[:images].tolist()
    chunks = (zip(rec.read_images(keys[k:k + 1024]), labels[k:k + 1024]) for k in range(0, len(keys), 1024))
    write_rec(dst, (sample for chunk in chunks for sample in chunk), num_classes=max(labels) + 1)


def copy_fsynced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    dst.unlink()


def convert(src: Path, dst: Path) -> None:
    from facesiam.data import write_shards

    write_shards(src, dst, progress=False, overwrite=True)
    shutil.rmtree(dst)


PEAK_RSS = """
import resource, sys
from facesiam.data import write_shards
import facesiam.data.readers, facesiam.data.recordio
status = open("/proc/self/status").read().split("VmRSS:")[1]
before = int(status.split()[0])  # kB resident once everything is imported
write_shards(sys.argv[1], sys.argv[2], progress=False)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(src: Path, dst: Path) -> tuple[float, float]:
    """(RSS after the imports, peak RSS at the end) of make_shards in a fresh process, MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(src), str(dst)], env=env, capture_output=True,
                         text=True, timeout=1800, check=True).stdout
    shutil.rmtree(dst)
    before, after = out.split()[-2:]
    return int(before) / 1024, int(after) / 1024  # ru_maxrss: kB on Linux


def loader_pass(data_path: Path, workers: int, batch_size: int, batches: int) -> int:
    """``batches`` batches of the training loader (setup.build_data) over ``data_path``: images delivered."""
    import torch

    from facesiam.config import TrainConfig
    from facesiam.training.setup import build_data

    cfg = TrainConfig()
    cfg.data, cfg.num_workers, cfg.batch_size, cfg.m_per_class = str(data_path), workers, batch_size, 4
    cfg.model.image_size, cfg.model.center_crop, cfg.val_split = 112, None, "none"
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    data = build_data(cfg, accelerator)
    data.sampler.set_epoch(0)
    seen = 0
    for k, (images, labels) in enumerate(data.loader):
        seen += len(labels)
        if k + 1 == batches:
            break
    return seen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="images in the synthetic .rec")
    parser.add_argument("--per-identity", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=120, help="loader batches per reading pass")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--write-doc", action="store_true", help=f"update '{HEADING}' in docs/benchmarks.md")
    parser.add_argument("--convert-only", action="store_true",
                        help="measure (a)'s speed only (make_shards vs the copy): no memory or loader runs, no doc")
    args = parser.parse_args(argv)
    if args.convert_only and args.write_doc:
        parser.error("--write-doc needs every measurement: drop --convert-only")
    import torch

    from facesiam.data import write_shards

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_rec_", dir=args.work) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        made = synthetic_rec(tmp / "rec", args.images, args.per_identity)
        print(f"synthetic .rec: {made['images']:,} images, {made['identities']:,} identities, "
              f"{made['bytes'] / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        (tmp / "copies").mkdir()
        conv = race(args.repeats, {"copy": lambda: copy_fsynced(tmp / "rec" / "train.rec", tmp / "copies" / "c"),
                                   "make_shards": lambda: convert(tmp / "rec", tmp / "shards_t")})
        if args.convert_only:
            copy_s, conv_s = conv["copy"][0], conv["make_shards"][0]
            print(f"copy {copy_s:.2f} s, make_shards {conv_s:.2f} s ({made['images'] / conv_s:,.0f} img/s): "
                  f"{copy_s / conv_s:.2f}x the copy's speed (best of {args.repeats}; CPU s: copy "
                  f"{conv['copy'][1]:.2f}, make_shards {conv['make_shards'][1]:.2f})")
            return {"copy_s": copy_s, "convert_s": conv_s, "convert_vs_copy": copy_s / conv_s}
        subset_rec(tmp / "rec", tmp / "quarter", args.images // 4)
        rss = {"quarter": peak_rss_mb(tmp / "quarter", tmp / "m1"), "all": peak_rss_mb(tmp / "rec", tmp / "m2")}

        shards_mb = write_shards(tmp / "rec", tmp / "shards", progress=False)["bytes"] / 1e6
        loader_pass(tmp / "rec", args.workers, args.batch_size, 2)  # warm the page cache and imports for both
        loader_pass(tmp / "shards", args.workers, args.batch_size, 2)
        counts = {}

        def reader(name: str, path: Path):
            return lambda: counts.__setitem__(name, loader_pass(path, args.workers, args.batch_size, args.batches))

        read = race(args.repeats, {"shards": reader("shards", tmp / "shards"), "rec": reader("rec", tmp / "rec")})

    copy_s, conv_s = conv["copy"][0], conv["make_shards"][0]
    results = {
        "images": made["images"], "identities": made["identities"], "mb": made["bytes"] / 1e6, "shards_mb": shards_mb,
        "copy_s": copy_s, "convert_s": conv_s, "convert_vs_copy": copy_s / conv_s,
        "convert_img_s": made["images"] / conv_s, "rss_mb": rss, "rss_images": [args.images // 4, args.images],
        "shards_img_s": counts["shards"] / read["shards"][0], "rec_img_s": counts["rec"] / read["rec"][0],
        "read_images": counts["rec"], "workers": args.workers, "batch_size": args.batch_size,
        "cpus": len(os.sched_getaffinity(0)), "repeats": args.repeats,
    }
    results["rec_vs_shards"] = results["rec_img_s"] / results["shards_img_s"]
    text = report(results)
    print(text)
    print(json.dumps(results), file=sys.stderr)
    if args.write_doc:
        write_section(HEADING, text)
    return results


def report(r: dict) -> str:
    goal = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return "\n".join([
        HEADING, "",
        f"`python tools/bench_rec.py --images {r['images']}`: a synthetic header-0 .rec of {r['images']:,} 112 px "
        f"JPEGs ({r['identities']:,} identities, {r['mb']:.0f} MB; tools/bench_rec.py draws them), on "
        f"{r['cpus']} shared CPU cores, warm page cache, best of {r['repeats']} interleaved runs.", "",
        "| | baseline | facesiam | ratio | goal |",
        "|---|---|---|---|---|",
        f"| .rec -> shards (make_shards, bytes as stored) vs copying train.rec (+ fsync) | {r['copy_s']:.2f} s | "
        f"{r['convert_s']:.2f} s ({r['convert_img_s']:,.0f} img/s) | {r['convert_vs_copy']:.2f}x | >= 0.5x "
        f"{goal(r['convert_vs_copy'] >= 0.5)} |",
        f"| training loader, {r['workers']} workers, batch {r['batch_size']}, 112 px fused train transform: the .rec "
        f"read directly vs its shards ({r['read_images']:,} images a pass) | {r['shards_img_s']:,.0f} img/s | "
        f"{r['rec_img_s']:,.0f} img/s | {r['rec_vs_shards']:.2f}x | >= 0.9x {goal(r['rec_vs_shards'] >= 0.9)} |",
        "",
        f"Peak memory (RSS) of make_shards in a fresh process: {r['rss_mb']['quarter'][1]:.0f} MB for "
        f"{r['rss_images'][0]:,} images, {r['rss_mb']['all'][1]:.0f} MB for {r['rss_images'][1]:,} (of which "
        f"{r['rss_mb']['all'][0]:.0f} MB are the imports): "
        f"+{r['rss_mb']['quarter'][1] - r['rss_mb']['quarter'][0]:.0f} MB vs "
        f"+{r['rss_mb']['all'][1] - r['rss_mb']['all'][0]:.0f} MB of work, flat in the data size (the index and "
        "labels are ~50 bytes an image; records are read 1,024 at a time, one read each batch). The copy is the floor any converter "
        "pays (read + write + fsync of the same bytes); make_shards adds three tar members and an index entry per "
        f"image, and writes more bytes than it reads: the shards hold {r['shards_mb']:.0f} MB against the .rec's "
        f"{r['mb']:.0f} MB (a 512-byte header for each of the three members of an image, each member padded to 512 "
        "bytes). Its shards are written from a second thread, two buffers an image in one os.writev a batch, each "
        "batch's writeback to disk started at once (sync_file_range) so that the disk works while the next batch is "
        "built and each shard's fsync (on a thread of its own, while the next shard is written) waits only for its "
        "last batch.",
        "",
    ])


if __name__ == "__main__":
    main()
