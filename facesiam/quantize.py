"""int8 models for CPUs: onnxruntime's static quantization of a facesiam ONNX export, calibrated on training photos
and judged on held-out people by facesiam's own evaluator (``facesiam export --int8``).

A room above eval/ (tests/test_layout.py): the parity check scores both models with eval's verification metrics,
and export.py, which eval's inference path imports, must not.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import InputError
from .export import export_onnx
from .fileio import atomic_write
from .onnx_runtime import METADATA_KEY, int8_products_exact, parity_line

log = logging.getLogger("facesiam.export")

INT8_FAR = 1e-3               # the operating point whose TAR the int8 model must keep
INT8_TAR_TOLERANCE = 0.01     # |TAR@FAR=1e-3 int8 - fp32|, absolute, at most
INT8_AUC_TOLERANCE = 0.002    # |AUC int8 - fp32| at most
CALIBRATION_IMAGES = 300      # training photos whose activation ranges set the int8 scales
CALIBRATION_BATCH = 32


INT8_WEIGHTS = ("auto", "portable", "full")


def export_int8(checkpoint: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike,
                parity_data: Optional[str | os.PathLike] = None, parity_split: str = "val",
                calibration_images: int = CALIBRATION_IMAGES, opset: int = 18, overwrite: bool = False,
                check: bool = True, align: bool = True, threads: Optional[int] = None, seed: int = 0,
                progress: bool = True, flip: bool = False, weights: str = "auto") -> dict:
    """RUN/best -> an int8 out.onnx for CPUs, or an InputError and no file when it loses accuracy (``flip``: the
    model embeds each face with its mirror image, export_onnx's FlipSum).

    The fp32 export (``export_onnx``) is quantized by onnxruntime (``quantize_static``, see ``quantize_int8``),
    calibrated on ``calibration_images`` photos of DATA's train split, fed exactly as OnnxEmbedder feeds photos.
    ``weights``: portable (7-bit weights where the CPU's int8 product may saturate: exact on every CPU), full (8-bit:
    exact only where ``int8_products_exact``; serve refuses the file elsewhere), or auto: portable, and where this
    CPU multiplies int8 exactly, full too, kept only if portable misses parity. Each candidate and the fp32 model
    embed the held-out people (``parity_data``, default DATA's ``parity_split``); the first candidate whose all-pairs
    TAR@FAR=1e-3 is within INT8_TAR_TOLERANCE and AUC within INT8_AUC_TOLERANCE of fp32's is written (atomically),
    its numbers in its metadata ("int8"), where `facesiam serve` shows them.
    """
    import onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it")
    if calibration_images < 1:
        raise InputError(f"--calibration-images must be >= 1, got {calibration_images}")
    if weights not in INT8_WEIGHTS:
        raise InputError(f"--int8-weights must be one of {', '.join(INT8_WEIGHTS)}, got {weights!r}")
    exact = int8_products_exact()
    if weights == "full" and not exact:
        raise InputError(f"{out}: --int8-weights full needs a CPU whose int8 products are exact (x86 with VNNI or "
                         f"AMX, or ARM64), which this one ({'x86 without VNNI' if exact is False else 'unknown'}) "
                         "is not: its parity would be measured wrong; use --int8-weights portable")
    candidates = {"auto": ["portable", "full"] if exact else ["portable"]}.get(weights, [weights])
    if parity_data is None:
        from .data import ImageFolderDataset, open_dataset

        if isinstance(open_dataset(data, split=parity_split), ImageFolderDataset):  # fails fast, before the export
            raise InputError(f"{data} is an image folder, one set of people and no held-out split: pass "
                             "--parity-data with photos of other people (or make shards with --val-identities)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facesiam-int8-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        summary = export_onnx(checkpoint, fp32_path, opset=opset, check=check, flip=flip)
        int8_paths = {name: Path(tmp) / f"int8-{name}.onnx" for name in candidates}
        calibration = {name: quantize_int8(fp32_path, path, data, images=calibration_images, align=align,
                                           seed=seed, progress=progress, weights=name)
                       for name, path in int8_paths.items()}
        parities = int8_parity(fp32_path, int8_paths, parity_data or data, split=parity_split, align=align,
                               threads=threads, progress=progress)
        chosen = next((name for name in candidates if parities[name]["ok"]), None)
        tried = "; ".join(f"{name} weights: {parity_line(parities[name])}" for name in candidates)
        if chosen is None:
            first = parities[candidates[0]]
            raise InputError(f"{out}: int8 model fails parity on {first['data']} ({first['split']}, "
                             f"{first['images']} photos of {first['identities']} people), nothing written: {tried}; "
                             f"keep the fp32 export (or calibrate on more photos: --calibration-images "
                             f"{2 * calibration[candidates[0]]['images']})")
        parity, calibration = parities[chosen], calibration[chosen]
        if len(candidates) > 1:
            log.info("int8: %s", tried)
        if chosen == "full":
            log.warning("int8: portable weights miss parity (%s); written with full 8-bit weights, exact on this CPU "
                        "(VNNI): serve refuses the file on x86 CPUs without VNNI",
                        parity_line(parities["portable"]))
        if parity["speedup"] is not None and parity["speedup"] < 1:
            log.warning("int8: %.2fx the speed of fp32 on this CPU (the network alone, on the parity photos); keep "
                        "the fp32 export for CPUs like this one (int8 pays where the CPU has VNNI)",
                        parity["speedup"])
        proto = onnx.load(str(int8_paths[chosen]))
        meta = {**json.loads(_metadata(proto)[METADATA_KEY]), "int8": {"calibration": calibration, "parity": parity}}
        onnx.helper.set_model_props(proto, {**_metadata(proto), METADATA_KEY: json.dumps(meta)})
        with atomic_write(out, "wb") as f:
            f.write(proto.SerializeToString())
    summary.update(out=str(out), int8=True, bytes=out.stat().st_size, fp32_bytes=summary["bytes"],
                   calibration=calibration, parity=parity, candidates=parities, seconds=time.perf_counter() - start)
    return summary


def _metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, data: str | os.PathLike, *,
                  images: int = CALIBRATION_IMAGES, align: bool = True, seed: int = 0, progress: bool = True,
                  weights: str = "portable") -> dict:
    """fp32 ONNX -> QDQ int8 ONNX (onnxruntime's static quantization), calibrated on DATA's train split;
    ``weights`` portable or full (export_int8).

    The graph first goes through onnxruntime's quant_pre_process (ONNX shape inference and graph optimisation; its
    symbolic shape inference is skipped: it fails on the exporter's Expand nodes and the batch is the only
    dynamic axis). Returns what the calibration used.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .eval.embed import open_as_trained
    from .onnx_runtime import OnnxEmbedder

    embedder = OnnxEmbedder(fp32_path, providers=["CPUExecutionProvider"])
    dataset, aligned = open_as_trained(data, "train", embedder.alignment, align, transform=None, log_it=progress)
    if len(dataset) == 0:
        raise InputError(f"{data}: no training photos to calibrate the int8 model on")
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), min(images, len(dataset)), replace=False))

    class Photos(CalibrationDataReader):
        """Batches of the picked photos, preprocessed by the fp32 model's own OnnxEmbedder.preprocess."""

        def __init__(self):
            self.batches = calibration_batches(embedder, dataset, picks, progress=progress)

        def get_next(self) -> Optional[dict]:
            batch = next(self.batches, None)
            return None if batch is None else {embedder.meta["input"]: batch}

    prepared = Path(int8_path).with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    head = embedding_head(prepared)
    # uint8 activations x int8 weights (U8S8): onnxruntime's fast path on x86 CPUs; per-channel weight scales keep
    # depthwise convolutions (MobileFaceNet, EfficientNet) accurate. The head (after the last convolution: pooling,
    # the embedding layer, its normalisation) stays fp32: a sliver of the compute, and its rounding would land
    # on the embedding unfiltered
    # portable: 7-bit weights (reduce_range) for the convolutions onnxruntime runs as u8 x s8 matrix products. x86
    # CPUs without VNNI sum those products in pairs into saturating 16 bits (vpmaddubsw), which full-range weights
    # overflow (onnxruntime advises 7 bits there); measured on a trained Lite0 student on such a CPU: full range lost
    # 0.040 TAR@FAR=1e-3 (refused), 7 bits 0.0022. Depthwise convolutions keep all 8 bits: onnxruntime's depthwise
    # kernels widen to 16 bits and sum in 32 (MlasConvDepthwiseKernel), exact on every CPU, and with 9 weights a
    # channel they are where the 7th bit costs most (fit's LFW student: TAR gap 0.0213 -> 0.0062).
    # full: 8 bits everywhere, for CPUs whose products are exact (int8_products_exact); docs/benchmarks.md
    if weights not in ("portable", "full"):
        raise ValueError(f"weights must be portable or full, got {weights!r}")
    portable = weights == "portable"
    overrides = {name: [{"axis": 0, "reduce_range": False}] + [{} for _ in range(channels - 1)]
                 for name, channels in depthwise_weights(prepared).items()} if portable else {}
    quantize_static(str(prepared), str(int8_path), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=portable, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=head, extra_options={"TensorQuantOverrides": overrides})
    log.info("int8: calibrated on %d training photos of %s (alignment %s), %s weights", len(picks), data, aligned,
             weights)
    bits = "7-bit int8 weights (8-bit in depthwise convolutions)" if portable else "8-bit int8 weights"
    return {"data": str(data), "split": "train", "images": int(len(picks)), "seed": seed, "method": "minmax",
            "weights": weights, "format": f"QDQ, per-channel {bits}, uint8 activations", "fp32_nodes": len(head)}


def depthwise_weights(path: str | os.PathLike) -> dict[str, int]:
    """The graph's depthwise convolutions (one input channel a group): weight initializer name -> its channels."""
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    found = {}
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if shape and group > 1 and shape[1] == 1 and shape[0] == group:
            found[node.input[1]] = shape[0]
    return found


def embedding_head(path: str | os.PathLike) -> list[str]:
    """Names of the graph's nodes after its last convolution (ONNX nodes are stored in topological order)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    last_conv = max((i for i, node in enumerate(nodes) if node.op_type == "Conv"), default=len(nodes) - 1)
    return [node.name for node in nodes[last_conv + 1:] if node.name]


def calibration_batches(embedder, dataset: Any, picks: np.ndarray, *, progress: bool = True) -> Iterator[np.ndarray]:
    """N x 3 x S x S float32 batches of dataset[picks], preprocessed as the model's inputs (embedder.preprocess)."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(picks), CALIBRATION_BATCH), desc="int8 calibration", unit="batch",
                      disable=not progress):
        chunk = picks[start:start + CALIBRATION_BATCH]
        yield np.stack([embedder.preprocess(dataset[int(i)][0]) for i in chunk])


def int8_parity(fp32_path: str | os.PathLike, int8_paths: dict[str, str | os.PathLike], data: str | os.PathLike,
                *, split: str = "val", align: bool = True, threads: Optional[int] = None, batch_size: int = 64,
                progress: bool = True) -> dict[str, dict]:
    """The fp32 model and each int8 model (name -> path) on the same held-out photos (each decoded and preprocessed
    once): per int8 model, all-pairs TAR@FAR=1e-3 and AUC of both from facesiam's evaluator, their gaps, and whether
    they are within the tolerances ("ok")."""
    from tqdm.auto import tqdm

    from .eval.embed import open_as_trained
    from .eval.metrics import verification_metrics
    from .eval.verification import far_key
    from .onnx_runtime import OnnxEmbedder

    models = {"fp32": OnnxEmbedder(fp32_path, threads=threads, providers=["CPUExecutionProvider"]),
              **{name: OnnxEmbedder(path, threads=threads, providers=["CPUExecutionProvider"])
                 for name, path in int8_paths.items()}}
    fp32 = models["fp32"]
    dataset, _ = open_as_trained(data, split, fp32.alignment, align, transform=None, log_it=False)
    emb: dict[str, list] = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    for start in tqdm(range(0, len(dataset), batch_size), desc="int8 parity", unit="batch", disable=not progress):
        x = np.stack([fp32.preprocess(dataset[i][0]) for i in range(start, min(len(dataset), start + batch_size))])
        for name, model in models.items():  # the same batch, one after the other
            t = time.perf_counter()
            emb[name].append(model.embed_arrays(x))
            seconds[name] += time.perf_counter() - t
    labels = np.asarray(dataset.labels, np.int64)
    identities = int(len(np.unique(labels)))
    key = far_key(INT8_FAR)
    scores, impostor_pairs = {}, 0
    for name in models:
        metrics = verification_metrics(np.concatenate(emb[name]) if emb[name] else
                                       np.zeros((0, fp32.embedding_dim)), labels)
        scores[name] = {"tar": metrics["tar_at_far"][key], "auc": metrics["auc"]}
        impostor_pairs = metrics["n_impostor"]
    if scores["fp32"]["tar"] is None:
        raise InputError(f"{data} ({split}): {len(labels)} photos of {identities} people give {impostor_pairs} "
                         f"impostor pairs, fewer than the {round(1 / INT8_FAR)} that TAR@FAR={INT8_FAR:g} needs; "
                         "pass --parity-data with more held-out people")
    results = {}
    for name in int8_paths:
        result: dict = {"data": str(data), "split": split, "images": int(len(labels)), "identities": identities,
                        "far": INT8_FAR, "tolerance": {"tar": INT8_TAR_TOLERANCE, "auc": INT8_AUC_TOLERANCE},
                        "impostor_pairs": impostor_pairs, "fp32": dict(scores["fp32"]), "int8": dict(scores[name])}
        result["tar_gap"] = abs(result["int8"]["tar"] - result["fp32"]["tar"])
        result["auc_gap"] = abs(result["int8"]["auc"] - result["fp32"]["auc"])
        result["ok"] = result["tar_gap"] <= INT8_TAR_TOLERANCE and result["auc_gap"] <= INT8_AUC_TOLERANCE
        # the network alone on this CPU, on the parity photos (int8's images/s over fp32's): int8 pays only where
        # the CPU multiplies int8 fast (VNNI) and the graph quantizes whole (MobileFaceNet's PReLUs stay fp32
        # between quantized convolutions: 0.81x on an AVX2 CPU without VNNI; docs/benchmarks.md)
        result["speedup"] = seconds["fp32"] / seconds[name] if seconds[name] > 0 else None
        results[name] = result
    return results
