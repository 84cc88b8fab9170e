"""Which int8 recipe keeps a trained model's accuracy? onnxruntime's static quantization variants against fp32 on
held-out people (docs/benchmarks.md, "Inference: int8 vs fp32 on the CPU").

    python tools/bench_int8_recipes.py --checkpoint RUN/finetune/best --data RUN/shards [--flip] [--seed 1]

One fp32 export, its held-out embeddings computed once; per recipe: the all-pairs TAR@FAR=1e-3 and AUC gaps
(facesiam's evaluator, as `export --int8` judges them) and 1 - the mean cosine between each photo's int8 and fp32
embedding. `portable` and `full` are `export --int8`'s own recipes (quantize.quantize_int8); the others vary
onnxruntime's options around the old one (7-bit weights everywhere).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facesiam import quantize  # noqa: E402
from facesiam.eval.embed import open_as_trained  # noqa: E402
from facesiam.eval.metrics import verification_metrics  # noqa: E402
from facesiam.eval.verification import far_key  # noqa: E402
from facesiam.export import export_onnx  # noqa: E402
from facesiam.onnx_runtime import OnnxEmbedder  # noqa: E402

RECIPES = ("7bit", "7bit_stem_fp32", "7bit_stem_last_fp32", "7bit_percentile", "7bit_entropy", "portable", "full")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained RUN/best")
    p.add_argument("--data", required=True, help="its shards: calibration on train, parity on val")
    p.add_argument("--flip", action="store_true", help="the model with its mirror image (export --flip)")
    p.add_argument("--images", type=int, default=320, help="calibration photos (a multiple of 32: percentile and "
                   "entropy need equal batches)")
    p.add_argument("--seed", type=int, default=0, help="which calibration photos")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    args = p.parse_args()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_path, prepared = tmp / "fp32.onnx", tmp / "prepared.onnx"
        export_onnx(args.checkpoint, fp32_path, flip=args.flip)
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        fp32 = OnnxEmbedder(fp32_path, providers=["CPUExecutionProvider"])
        val, _ = open_as_trained(args.data, "val", fp32.alignment, True, transform=None, log_it=False)
        train, _ = open_as_trained(args.data, "train", fp32.alignment, True, transform=None, log_it=False)
        x = np.stack([fp32.preprocess(val[i][0]) for i in range(len(val))])
        labels = np.asarray(val.labels, np.int64)

        def embed(model: OnnxEmbedder) -> np.ndarray:
            return np.concatenate([model.embed_arrays(x[s:s + 64]) for s in range(0, len(x), 64)])

        def score(emb: np.ndarray) -> tuple[float, float]:
            m = verification_metrics(emb, labels)
            return m["tar_at_far"][far_key(quantize.INT8_FAR)], m["auc"]

        ref = embed(fp32)
        tar32, auc32 = score(ref)
        print(f"fp32: TAR@FAR=1e-3 {tar32:.4f}, AUC {auc32:.4f} ({len(labels)} held-out photos)", flush=True)
        picks = np.sort(np.random.default_rng(args.seed).choice(len(train), min(args.images, len(train)),
                                                                 replace=False))

        class Photos(CalibrationDataReader):
            def __init__(self):
                self.batches = quantize.calibration_batches(fp32, train, picks, progress=False)

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {fp32.meta["input"]: batch}

        convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        head = quantize.embedding_head(prepared)
        variants = {"7bit": {}, "7bit_stem_fp32": {"exclude": convs[:1]},
                    "7bit_stem_last_fp32": {"exclude": convs[:1] + convs[-1:]},
                    "7bit_percentile": {"method": CalibrationMethod.Percentile,
                                        "extra": {"CalibPercentile": 99.99}},
                    "7bit_entropy": {"method": CalibrationMethod.Entropy}}
        for name in args.recipes.split(","):
            out, start = tmp / f"{name}.onnx", time.perf_counter()
            if name in ("portable", "full"):
                quantize.quantize_int8(fp32_path, out, args.data, images=len(picks), seed=args.seed,
                                       progress=False, weights=name)
            elif name in variants:
                v = variants[name]
                quantize_static(str(prepared), str(out), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=head + v.get("exclude", []),
                                calibrate_method=v.get("method", CalibrationMethod.MinMax),
                                extra_options=v.get("extra", {}))
            else:
                raise SystemExit(f"unknown recipe {name!r}: choose from {', '.join(RECIPES)}")
            emb = embed(OnnxEmbedder(out, providers=["CPUExecutionProvider"]))
            tar8, auc8 = score(emb)
            print(f"{name:20s} TAR gap {abs(tar8 - tar32):.4f}, AUC gap {abs(auc8 - auc32):.4f}, "
                  f"1 - cos {1 - float(np.mean(np.sum(emb * ref, axis=1))):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
