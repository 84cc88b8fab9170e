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
from .onnx_runtime import METADATA_KEY, parity_line

log = logging.getLogger("facesiam.export")

INT8_FAR = 1e-3               # the operating point whose TAR the int8 model must keep
INT8_TAR_TOLERANCE = 0.01     # |TAR@FAR=1e-3 int8 - fp32|, absolute, at most
INT8_AUC_TOLERANCE = 0.002    # |AUC int8 - fp32| at most
CALIBRATION_IMAGES = 300      # training photos whose activation ranges set the int8 scales
CALIBRATION_BATCH = 32


def export_int8(checkpoint: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike,
                parity_data: Optional[str | os.PathLike] = None, parity_split: str = "val",
                calibration_images: int = CALIBRATION_IMAGES, opset: int = 18, overwrite: bool = False,
                check: bool = True, align: bool = True, threads: Optional[int] = None, seed: int = 0,
                progress: bool = True, flip: bool = False) -> dict:
    """RUN/best -> an int8 out.onnx for CPUs, or an InputError and no file when it loses accuracy (``flip``: the
    model embeds each face with its mirror image, export_onnx's FlipSum).

    The fp32 export (``export_onnx``) is quantized by onnxruntime (``quantize_static``: QDQ, per-channel int8
    weights, uint8 activations whose ranges come from ``calibration_images`` photos of DATA's train split, fed
    exactly as OnnxEmbedder feeds photos). Both models then embed the held-out people (``parity_data``, default
    DATA's ``parity_split``); the int8 file is written (atomically) only if its all-pairs TAR@FAR=1e-3 is within
    INT8_TAR_TOLERANCE and its AUC within INT8_AUC_TOLERANCE of fp32's. Those numbers go into its metadata
    ("int8"), where `facesiam serve` shows them.
    """
    import onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it")
    if calibration_images < 1:
        raise InputError(f"--calibration-images must be >= 1, got {calibration_images}")
    if parity_data is None:
        from .data import ImageFolderDataset, open_dataset

        if isinstance(open_dataset(data, split=parity_split), ImageFolderDataset):  # fails fast, before the export
            raise InputError(f"{data} is an image folder, one set of people and no held-out split: pass "
                             "--parity-data with photos of other people (or make shards with --val-identities)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facesiam-int8-") as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        summary = export_onnx(checkpoint, fp32_path, opset=opset, check=check, flip=flip)
        calibration = quantize_int8(fp32_path, int8_path, data, images=calibration_images, align=align,
                                    seed=seed, progress=progress)
        parity = int8_parity(fp32_path, int8_path, parity_data or data, split=parity_split, align=align,
                             threads=threads, progress=progress)
        if not parity["ok"]:
            raise InputError(f"{out}: int8 model fails parity on {parity['data']} ({parity['split']}, "
                             f"{parity['images']} photos of {parity['identities']} people), nothing written: "
                             f"{parity_line(parity)}; calibrate on more photos (--calibration-images "
                             f"{2 * calibration['images']}) or keep the fp32 export")
        if parity["speedup"] is not None and parity["speedup"] < 1:
            log.warning("int8: %.2fx the speed of fp32 on this CPU (the network alone, on the parity photos); keep "
                        "the fp32 export for CPUs like this one (int8 pays where the CPU has VNNI)",
                        parity["speedup"])
        proto = onnx.load(str(int8_path))
        meta = {**json.loads(_metadata(proto)[METADATA_KEY]), "int8": {"calibration": calibration, "parity": parity}}
        onnx.helper.set_model_props(proto, {**_metadata(proto), METADATA_KEY: json.dumps(meta)})
        with atomic_write(out, "wb") as f:
            f.write(proto.SerializeToString())
    summary.update(out=str(out), int8=True, bytes=out.stat().st_size, fp32_bytes=summary["bytes"],
                   calibration=calibration, parity=parity, seconds=time.perf_counter() - start)
    return summary


def _metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, data: str | os.PathLike, *,
                  images: int = CALIBRATION_IMAGES, align: bool = True, seed: int = 0, progress: bool = True) -> dict:
    """fp32 ONNX -> QDQ int8 ONNX (onnxruntime's static quantization), calibrated on DATA's train split.

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
    # reduce_range: 7-bit weights. x86 CPUs without VNNI multiply u8 x s8 pairs into saturating 16-bit sums
    # (vpmaddubsw), which full-range weights overflow; onnxruntime advises 7 bits there, and a file exported here may
    # be served on either kind of CPU. Measured on the trained Lite0 student (LFW held-out people, AVX2 without VNNI):
    # full range lost 0.040 TAR@FAR=1e-3 and 0.0054 AUC (refused); 7 bits 0.0022 and 0.0002 (docs/benchmarks.md).
    quantize_static(str(prepared), str(int8_path), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=head)
    log.info("int8: calibrated on %d training photos of %s (alignment %s)", len(picks), data, aligned)
    return {"data": str(data), "split": "train", "images": int(len(picks)), "seed": seed, "method": "minmax",
            "format": "QDQ, per-channel 7-bit int8 weights (reduce_range), uint8 activations", "fp32_nodes": len(head)}


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


def int8_parity(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, data: str | os.PathLike, *,
                split: str = "val", align: bool = True, threads: Optional[int] = None, batch_size: int = 64,
                progress: bool = True) -> dict:
    """Both models on the same held-out photos (each decoded and preprocessed once): all-pairs TAR@FAR=1e-3 and
    AUC from facesiam's evaluator, their gaps, and whether they are within the tolerances ("ok")."""
    from tqdm.auto import tqdm

    from .eval.embed import open_as_trained
    from .eval.metrics import verification_metrics
    from .eval.verification import far_key
    from .onnx_runtime import OnnxEmbedder

    fp32 = OnnxEmbedder(fp32_path, threads=threads, providers=["CPUExecutionProvider"])
    int8 = OnnxEmbedder(int8_path, threads=threads, providers=["CPUExecutionProvider"])
    dataset, _ = open_as_trained(data, split, fp32.alignment, align, transform=None, log_it=False)
    emb32, emb8, seconds = [], [], {"fp32": 0.0, "int8": 0.0}
    for start in tqdm(range(0, len(dataset), batch_size), desc="int8 parity", unit="batch", disable=not progress):
        x = np.stack([fp32.preprocess(dataset[i][0]) for i in range(start, min(len(dataset), start + batch_size))])
        for name, model, out in (("fp32", fp32, emb32), ("int8", int8, emb8)):  # the same batch, one after the other
            t = time.perf_counter()
            out.append(model.embed_arrays(x))
            seconds[name] += time.perf_counter() - t
    labels = np.asarray(dataset.labels, np.int64)
    key = far_key(INT8_FAR)
    result: dict = {"data": str(data), "split": split, "images": int(len(labels)),
                    "identities": int(len(np.unique(labels))), "far": INT8_FAR,
                    "tolerance": {"tar": INT8_TAR_TOLERANCE, "auc": INT8_AUC_TOLERANCE}}
    for name, emb in (("fp32", emb32), ("int8", emb8)):
        metrics = verification_metrics(np.concatenate(emb) if emb else np.zeros((0, fp32.embedding_dim)), labels)
        result[name] = {"tar": metrics["tar_at_far"][key], "auc": metrics["auc"]}
        result["impostor_pairs"] = metrics["n_impostor"]
    if result["fp32"]["tar"] is None:
        raise InputError(f"{data} ({split}): {result['images']} photos of {result['identities']} people give "
                         f"{result['impostor_pairs']} impostor pairs, fewer than the {round(1 / INT8_FAR)} that "
                         f"TAR@FAR={INT8_FAR:g} needs; pass --parity-data with more held-out people")
    result["tar_gap"] = abs(result["int8"]["tar"] - result["fp32"]["tar"])
    result["auc_gap"] = abs(result["int8"]["auc"] - result["fp32"]["auc"])
    result["ok"] = result["tar_gap"] <= INT8_TAR_TOLERANCE and result["auc_gap"] <= INT8_AUC_TOLERANCE
    # the network alone on this CPU, on the parity photos (int8's images/s over fp32's): int8 pays only where the
    # CPU multiplies int8 fast (VNNI) and the graph quantizes whole (MobileFaceNet's PReLUs stay fp32 between
    # quantized convolutions: 0.81x on an AVX2 CPU without VNNI; docs/benchmarks.md)
    result["speedup"] = seconds["fp32"] / seconds["int8"] if seconds["int8"] > 0 else None
    return result

