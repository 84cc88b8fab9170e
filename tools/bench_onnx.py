"""Benchmark: embedding throughput of an ONNX export on onnxruntime against the same model in torch, on the CPU,
same threads, same preprocessed batches (the network alone: decoding and resizing are the same for both).

    python tools/bench_onnx.py [--backbone tf_efficientnetv2_b0] [--image-size 112] [--threads 2] [--write-doc]

The model is randomly initialised (throughput does not depend on the weights). Prints the ratio measured in this
run; --write-doc replaces its section of docs/benchmarks.md.

    python tools/bench_onnx.py --int8 [--checkpoint RUN/best --data SHARDS] [--write-doc]

int8 against fp32 (facesiam export --int8): the network alone on the same batches, and photos/s through two
`facesiam serve --onnx` processes (fp32, int8) under the same load, measured interleaved. With --checkpoint and
--data the int8 export is the real one (calibrated on DATA's train split, refused unless its parity on DATA's val
split holds; the parity is reported); without, a random --backbone calibrated on synthetic faces (speed only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchdoc import LFW, race, write_section

from facesiam.config import ModelConfig
from facesiam.export import export_onnx
from facesiam.model import build_model, export_model
from facesiam.onnx_runtime import OnnxEmbedder
from facesiam.quantize import INT8_WEIGHTS

HEADING = "## Inference: onnxruntime vs torch (facesiam export --onnx)"
INT8_HEADING = "## Inference: int8 vs fp32 on the CPU (facesiam export --int8)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=ModelConfig.backbone)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both contenders")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    p.add_argument("--int8", action="store_true", help="int8 vs fp32 ONNX, the network alone and through serve")
    p.add_argument("--checkpoint", help="--int8: a trained RUN/best (default: random --backbone weights)")
    p.add_argument("--data", help="--int8 with --checkpoint: its shards (calibration: train split; parity and the "
                   "served photos: val split)")
    p.add_argument("--flip", action="store_true", help="--int8 with --checkpoint: both models embed each face with "
                   "its mirror image (export --flip, what fit exports)")
    p.add_argument("--int8-weights", choices=INT8_WEIGHTS, default="auto",
                   help="--int8 with --checkpoint: export --int8-weights")
    p.add_argument("--clients", type=int, default=8, help="--int8: concurrent clients of each server")
    p.add_argument("--requests", type=int, default=96, help="--int8: POST /verify requests (2 photos) per run")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()
    if args.int8:
        return int8_main(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        best = export_model(build_model(cfg), cfg, Path(tmp) / "best")
        summary = export_onnx(best, Path(tmp) / "model.onnx")
        from facesiam.model import load_exported

        model, _ = load_exported(best)
        embedder = OnnxEmbedder(Path(tmp) / "model.onnx", threads=args.threads, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(
            (args.batches, args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)

        def run_torch():
            with torch.inference_mode():
                for batch in x:
                    model(torch.from_numpy(batch))

        def run_onnx():
            for batch in x:
                embedder.embed_arrays(batch)

        run_torch(), run_onnx()  # warm-up: first-call allocations and graph optimisation
        times = race(args.repeats, {"torch": run_torch, "onnxruntime": run_onnx})
    n = args.batches * args.batch_size
    rate = {k: n / wall for k, (wall, _) in times.items()}
    ratio = rate["onnxruntime"] / rate["torch"]
    lines = [f"- {k}: {r:.1f} images/s" for k, r in rate.items()]
    print("\n".join(lines) + f"\nratio onnxruntime / torch: {ratio:.2f}x "
          f"(export parity: smallest cosine {summary['min_cosine']:.6f})")
    if args.write_doc:
        text = (f"{HEADING}\n\n{datetime.date.today()}, {os.cpu_count()} CPU cores, {args.threads} threads each, "
                f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, random weights, the network "
                f"alone on the same preprocessed batches (best of {args.repeats} interleaved runs; "
                "`python tools/bench_onnx.py --write-doc`).\n\n| runtime | images/s |\n|---|---:|\n"
                + "".join(f"| {k} | {r:.1f} |\n" for k, r in rate.items())
                + f"\nonnxruntime / torch: **{ratio:.2f}x**; torch vs onnxruntime embeddings on random inputs: "
                f"smallest cosine {summary['min_cosine']:.6f}.\n")
        write_section(HEADING, text)


def int8_main(args) -> None:
    """fp32 vs int8 ONNX: images/s of the network alone and photos/s through `facesiam serve`, ratios printed."""
    import io
    import subprocess
    import sys

    from bench_serve import TOKEN, photos, race_servers
    from benchdoc import REPO, free_port

    from facesiam.quantize import export_int8, quantize_int8

    if bool(args.checkpoint) != bool(args.data):
        raise SystemExit("--checkpoint and --data go together (a trained model and its shards)")
    if args.flip and not args.checkpoint:
        raise SystemExit("--flip measures a trained model: pass --checkpoint and --data")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
        if args.checkpoint:
            best, data = Path(args.checkpoint), Path(args.data)
            export_onnx(best, fp32, flip=args.flip)
            int8_summary = export_int8(best, int8, data=data, threads=args.threads, flip=args.flip,
                                       weights=args.int8_weights)
            parity, weights = int8_summary["parity"], int8_summary["calibration"]["weights"]
            backbone = json.loads((best / "config.json").read_text())["backbone"] if best.is_dir() else "?"
        else:
            from facesiam.data import write_shards
            from facesiam.synthetic import make_synthetic_faces

            torch.manual_seed(0)
            cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
            best = export_model(build_model(cfg), cfg, tmp / "best")
            faces = make_synthetic_faces(tmp / "faces", 40, 8, size=args.image_size, seed=0, workers=1,
                                         progress=False)
            data = tmp / "shards"
            write_shards(faces, data, val_identities=10, seed=0, workers=1, progress=False)
            export_onnx(best, fp32)
            quantize_int8(fp32, int8, data)
            parity, backbone, weights = None, args.backbone, "portable"
        embedders = {name: OnnxEmbedder(path, threads=args.threads, providers=["CPUExecutionProvider"])
                     for name, path in (("fp32", fp32), ("int8", int8))}
        size = embedders["fp32"].image_size
        x = np.random.default_rng(0).standard_normal((args.batches, args.batch_size, 3, size, size)).astype(np.float32)
        runs = {name: (lambda e=e: [e.embed_arrays(batch) for batch in x]) for name, e in embedders.items()}
        for run in runs.values():
            run()  # warm-up
        network = {k: args.batches * args.batch_size / wall for k, (wall, _) in race(args.repeats, runs).items()}
        print(f"network alone: fp32 {network['fp32']:.1f}, int8 {network['int8']:.1f} images/s, "
              f"int8 / fp32 {network['int8'] / network['fp32']:.2f}x", flush=True)

        aligned = bool(embedders["fp32"].alignment)
        if args.checkpoint:  # the model's own held-out photos, as the aligned crops it takes (no detector timed)
            from facesiam.data import open_dataset

            val = open_dataset(data, "val")
            images = []
            for i in range(min(64, len(val))):
                buf = io.BytesIO()
                val[i][0].save(buf, "JPEG", quality=95)
                images.append(buf.getvalue())
            source = f"{len(images)} photos of {data}'s val split (JPEG)"
        else:
            images = photos(64, tmp)
            source = "LFW JPEGs (250x250; Huang et al., 2007)" if LFW.is_dir() else "synthetic faces"
        env = {**os.environ, "FACESIAM_TOKEN": TOKEN, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        servers = {}
        for name, path in (("fp32", fp32), ("int8", int8)):
            port = free_port()
            proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--onnx", str(path),
                                     "--threshold", "0.5", "--port", str(port), "--threads", str(args.threads),
                                     *(["--no-align"] if aligned else [])], env=env,
                                    stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT)
            servers[name] = (f"http://127.0.0.1:{port}", proc)
        served = race_servers(servers, images, args.clients, args.requests, args.repeats,
                              lambda name, r: f"serve {name}: {2 * r['rps']:.1f} photos/s, p50 {r['p50']:.0f} ms, "
                                              f"p99 {r['p99']:.0f} ms, errors {r['errors']}")
        sizes = {name: path.stat().st_size / 1e6 for name, path in (("fp32", fp32), ("int8", int8))}
    ratio = served["int8"]["rps"] / served["fp32"]["rps"]
    print(f"through serve: int8 / fp32 {ratio:.2f}x photos/s")
    if parity:
        from facesiam.onnx_runtime import parity_line

        print(f"parity on {parity['images']} photos of {parity['identities']} held-out people: {parity_line(parity)}")
    if not args.write_doc:
        return
    from facesiam.onnx_runtime import parity_line

    rows = "".join(f"| {name} | {sizes[name]:.1f} | {network[name]:.1f} | {2 * served[name]['rps']:.1f} | "
                   f"{served[name]['p50']:.0f} | {served[name]['p99']:.0f} | {served[name]['errors']} |\n"
                   for name in ("fp32", "int8"))
    model = (f"{args.checkpoint} ({backbone}, trained{', with the mirror image: export --flip' if args.flip else ''}), "
             f"calibrated on {data}'s train split, {weights} int8 weights" if args.checkpoint
             else f"{backbone} at {args.image_size} px, random weights calibrated on synthetic faces (speed only)")
    command = (f"--checkpoint {args.checkpoint} --data {args.data}{' --flip' if args.flip else ''}"
               f"{'' if args.int8_weights == 'auto' else ' --int8-weights ' + args.int8_weights}" if args.checkpoint
               else f"--backbone {backbone} --image-size {args.image_size}")
    held_out = (f"Parity on {parity['images']} photos of {parity['identities']} held-out people (all pairs, "
                f"facesiam's evaluator): {parity_line(parity)}.\n" if parity
                else "Parity: not measured (random weights; pass --checkpoint and --data).\n")
    text = (f"{INT8_HEADING}\n\n{datetime.date.today()}, {os.cpu_count()} CPU cores, {args.threads} onnxruntime "
            f"threads each; {model}; `python tools/bench_onnx.py --int8 {command} --write-doc`. "
            f"Network alone: batches of "
            f"{args.batch_size}, best of {args.repeats} interleaved runs. Through serve: {args.clients} clients send "
            f"{args.requests} `POST /verify` (two photos each; {source}{', --no-align' if aligned else ''}) to "
            f"two `facesiam serve --onnx` processes, measured interleaved, best of {args.repeats}.\n\n"
            "| model | MB | network images/s | serve photos/s | p50 ms | p99 ms | errors |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n" + rows +
            f"\nint8 / fp32: **{ratio:.2f}x photos/s through serve** "
            f"({network['int8'] / network['fp32']:.2f}x the network alone). " + held_out)
    write_section(INT8_HEADING, text)
    print(f"wrote {INT8_HEADING!r} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
