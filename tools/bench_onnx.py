"""Benchmark: embedding throughput of an ONNX export on onnxruntime against the same model in torch, on the CPU,
same threads, same preprocessed batches (the network alone: decoding and resizing are the same for both).

    python tools/bench_onnx.py [--backbone tf_efficientnetv2_b0] [--image-size 112] [--threads 2] [--write-doc]

The model is randomly initialised (throughput does not depend on the weights). Prints the ratio measured in this
run; --write-doc replaces its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchdoc import race, write_section

from facesiam.config import ModelConfig
from facesiam.export import export_onnx
from facesiam.model import build_model, export_model
from facesiam.onnx_runtime import OnnxEmbedder

HEADING = "## Inference: onnxruntime vs torch (facesiam export --onnx)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=ModelConfig.backbone)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both contenders")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
