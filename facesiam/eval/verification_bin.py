"""Verification sets in insightface's .bin format (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin as the
MS1M/Glint/WebFace packs ship them): read them safely, write them, and score a model with the field's protocol.

Format: a pickle of ``(bins, issame_list)``: ``bins`` are 2N encoded images (JPEG/PNG bytes; packs made with
cv2.imencode hold 1-D uint8 numpy arrays instead), ``issame_list`` N booleans; pair i is images 2i and 2i+1, all
aligned 112x112 crops (ArcFace's five-point template).

Protocol (insightface recognition/arcface_torch/eval/verification.py ``test`` and ``evaluate``):

* each image and its mirror image go through the network; the two raw outputs are summed, then L2-normalised;
* a pair's distance is the squared Euclidean distance of the two embeddings (2 - 2 cos);
* 10-fold cross-validation over the pairs in file order (sklearn KFold, no shuffle: LFW's ten folds of 600): for
  each fold, the threshold in ``np.arange(0, 4, 0.01)`` with the best accuracy on the other nine folds ("same" when
  distance < threshold; the first best) is applied to the held-out fold; accuracy = mean +- std (population) of
  the ten;
* XNorm: the mean L2 norm of the raw outputs (images and mirrors), the training-health number of insightface's logs.

On the same pairs facesiam adds its exact AUC, EER and TAR@FAR (eval/verification.py ``score_metrics`` on the
cosine scores). The embedding loop is facesiam's one (eval/embed.py ``embed_dataset``, on every process under
accelerate); this module only supplies the dataset of decoded .bin images and the network without its final
normalisation (``RawOutputs``).

    sets = [read_bin("lfw.bin")]
    metrics = evaluate_bin(model, sets[0], eval_transform_for(cfg))      # accuracy_mean, accuracy_std, auc, ...
    make_bin("held_out_faces/", "pairs.txt", "mine.bin")                 # a .bin of your own held-out people
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import InputError
from ..fileio import atomic_write
from ..selection import bin_name, bin_paths  # the names of val_bin's sets live beside bin:NAME

log = logging.getLogger("facesiam.eval")

BIN_SIZE = 112                         # the field's aligned crops are 112 x 112
DEFAULT_FOLDS = 10
THRESHOLDS = np.arange(0, 4, 0.01)     # squared-distance thresholds the field searches
PICKLE_PROTOCOL = 4                    # readable by every Python 3 (insightface's loaders included)
PROTOCOL_NOTE = ("image + mirror image raw outputs summed, L2-normalised; squared Euclidean distance; 10-fold "
                 "cross-validation (KFold, no shuffle), threshold from np.arange(0, 4, 0.01) with the best accuracy "
                 "on the other 9 folds (insightface eval/verification.py)")

# Credits for the public verification sets a report may show numbers on (judged by the file name).
BIN_CREDITS = {
    "lfw": "LFW: G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, UMass Amherst TR 07-49, 2007.",
    "cfp": "CFP: S. Sengupta, J.-C. Chen, C. Castillo, V. M. Patel, R. Chellappa, D. W. Jacobs, "
           "\"Frontal to Profile Face Verification in the Wild\", WACV 2016.",
    "agedb": "AgeDB: S. Moschoglou, A. Papaioannou, C. Sagonas, J. Deng, I. Kotsia, S. Zafeiriou, \"AgeDB: the "
             "first manually collected, in-the-wild age database\", CVPR Workshops 2017.",
    "calfw": "CALFW: T. Zheng, W. Deng, J. Hu, \"Cross-Age LFW\", arXiv:1708.08197, 2017.",
    "cplfw": "CPLFW: T. Zheng, W. Deng, \"Cross-Pose LFW\", BUPT Tech. Rep. 18-01, 2018.",
}


# ------------------------------------------------------------------------------------------------ the file


@dataclass
class BinSet:
    """One verification set: ``images`` (2N encoded images), ``issame`` (N bool); pair i = images 2i, 2i+1."""

    name: str
    path: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def n_pairs(self) -> int:
        return int(len(self.issame))


def _only(what: str, ok: Callable[..., bool], build: Callable[..., Any]) -> Callable[..., Any]:
    """A pickle global that builds only what ``ok`` accepts (else the load fails naming ``what``)."""
    def call(*args: Any) -> Any:
        if not ok(*args):
            raise pickle.UnpicklingError(f"refused {what} with arguments {args!r:.60}")
        return build(*args)

    return call


def _plain_dtype(spec: Any, *args: Any) -> np.dtype:
    """numpy.dtype as a pickle rebuilds it, refusing object fields (they would let the pickle hold any object)."""
    spec = spec.decode("ascii") if isinstance(spec, bytes) else spec  # a Python 2 pickle's str is bytes here
    if not isinstance(spec, (str, np.dtype)):
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r:.60}")
    dtype = np.dtype(spec, *args[:2])
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused a numpy dtype holding Python objects")
    return dtype


def _is_plain(dtype: Any) -> bool:
    return isinstance(dtype, np.dtype) and not dtype.hasobject


# What a .bin may name, and nothing else. The packs were written by Python 2 (py2 str -> bytes with
# encoding="bytes", numpy scalars/arrays through numpy.core) and by Python 3 at protocols 2-5 (bytes through
# _codecs.encode at protocol 2, arrays through _frombuffer at 5). Each builder accepts only plain data.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _only("_codecs.encode", lambda text, enc="utf-8": isinstance(text, str) and enc == "latin1",
                                 lambda text, enc: text.encode("latin1")),
    ("__builtin__", "bytes"): _only("bytes", lambda *a: not a, lambda: b""),
    ("builtins", "bytes"): _only("bytes", lambda *a: not a, lambda: b""),
    ("__builtin__", "bytearray"): _only("bytearray", lambda *a: not a, lambda: bytearray()),
    ("builtins", "bytearray"): _only("bytearray", lambda *a: not a, lambda: bytearray()),
    ("numpy", "dtype"): _plain_dtype,
    ("numpy", "ndarray"): np.ndarray,  # only as _reconstruct's first argument (checked there)
}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _only(
        "numpy array", lambda cls, shape, dtype: cls is np.ndarray,
        lambda cls, shape, dtype: np.ndarray(shape, _plain_dtype(dtype)))
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _only(
        "numpy scalar", lambda dtype, data=b"": _is_plain(dtype) and isinstance(data, bytes),
        lambda dtype, data=b"": np.frombuffer(data, dtype, count=1)[0])
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _only(
        "numpy array", lambda buf, dtype, shape, order: _is_plain(dtype) and isinstance(buf, (bytes, bytearray)),
        lambda buf, dtype, shape, order: np.frombuffer(buf, dtype).reshape(shape, order=order))


class _BinUnpickler(pickle.Unpickler):
    """pickle.Unpickler that can build only containers, bytes, str, numbers, bools and plain numpy arrays.

    Why: unpickling runs whatever callable the file names (``os.system`` included), and .bin files are downloaded
    from third parties; the format needs no global beyond those in ``_SAFE_GLOBALS``, so any other is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a .bin never needs (refused: unpickling "
                                         "it could run code)") from None


def _as_bytes(item: Any) -> Optional[bytes]:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and (item.ndim == 1 or item.shape[1:] == (1,)):
        return item.tobytes()  # cv2.imencode's output: an (n,) or (n, 1) uint8 array
    return None


def _as_bool(item: Any) -> Optional[bool]:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    return None


def read_bin(path: Union[str, os.PathLike], *, check_images: bool = True) -> BinSet:
    """Read a .bin verification set; anything that is not one is a one-line InputError naming the file.

    ``check_images``: read every image's header (not its pixels) so a broken image fails here, not mid-evaluation.
    """
    from PIL import Image

    path = Path(path)
    fix = (f"a .bin holds pickle.dump((images, issame_list)) as insightface's packs do; make one with "
           f"tools/make_bin.py FOLDER pairs.txt {path.name}")
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} not found; {fix}")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": a Python 2 pack's image strings become bytes (the default would try ASCII and fail).
            obj = _BinUnpickler(f, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 -- a malformed pickle raises almost anything; all mean "not a .bin"
        raise InputError(f"{path}: not a .bin verification set ({type(err).__name__}: {' '.join(str(err).split())}); "
                         f"{fix}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise InputError(f"{path}: not a .bin verification set (expected a pair (images, issame_list), got "
                         f"{type(obj).__name__}{' of ' + str(len(obj)) if isinstance(obj, (tuple, list)) else ''}); "
                         f"{fix}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise InputError(f"{path}: not a .bin verification set (images must be a list, issame_list a list); {fix}")
    images = [_as_bytes(b) for b in bins]
    flags = [_as_bool(s) for s in np.asarray(issame).ravel().tolist()] if isinstance(issame, np.ndarray) else \
        [_as_bool(s) for s in issame]
    bad = next((i for i, b in enumerate(images) if b is None), None)
    if bad is not None:
        raise InputError(f"{path}: image {bad} is a {type(bins[bad]).__name__}, not encoded image bytes; {fix}")
    bad = next((i for i, s in enumerate(flags) if s is None), None)
    if bad is not None:
        raise InputError(f"{path}: issame_list[{bad}] is {flags[bad]!r:.40}, not a bool; {fix}")
    if not flags or len(images) != 2 * len(flags):
        raise InputError(f"{path}: {len(images)} images for {len(flags)} pairs (a .bin holds 2 images per pair); "
                         f"{fix}")
    if check_images:
        for i, raw in enumerate(images):
            try:
                with Image.open(io.BytesIO(raw)):
                    pass
            except Exception:  # noqa: BLE001 -- PIL raises several types for unreadable data
                raise InputError(f"{path}: image {i} (pair {i // 2}) is not an image file PIL can read "
                                 f"({len(raw)} bytes starting {raw[:8]!r}); {fix}") from None
    return BinSet(bin_name(path), str(path), images, np.asarray(flags, dtype=bool))


def write_bin(path: Union[str, os.PathLike], images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a .bin (atomically): pickle of (list of image bytes, list of bool), as insightface reads it."""
    images, issame = [bytes(b) for b in images], [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise InputError(f"{len(images)} images for {len(issame)} pairs: a .bin holds 2 images per pair")
    with atomic_write(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=PICKLE_PROTOCOL)
    return Path(path)


# ------------------------------------------------------------------------------------------------ embedding


class BinImages(Dataset):
    """The 2N images of a set, decoded like any facesiam image (``rgb_from_bytes``) and transformed: (tensor, i)."""

    def __init__(self, bins: BinSet, transform: Callable):
        self.images, self.name, self.transform = bins.images, bins.name, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from ..data.images import rgb_from_bytes

        return self.transform(rgb_from_bytes(self.images[index], f"{self.name}.bin image {index}")), index


class RawOutputs(nn.Module):
    """An EmbeddingModel without its final L2 normalisation, counting the outputs' norms.

    Why: the field's protocol sums the raw outputs of an image and its mirror image before normalising (facesiam's
    model normalises inside forward, and a sum of unit vectors weighs the two views equally instead), and its XNorm is
    the mean norm of those raw outputs. A model without ``trunk``/``head`` is used as it is (XNorm then None).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: evaluation runs eager
        self.raw = hasattr(self.inner, "trunk") and hasattr(self.inner, "head")
        self.train(model.training)  # embed_dataset restores this mode on the way out
        self.norm_sum: Optional[torch.Tensor] = None
        self.count = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = (self.inner.head(self.inner.trunk(images)) if self.raw else self.inner(images)).float()
        norms = out.norm(dim=1).sum()
        self.norm_sum = norms if self.norm_sum is None else self.norm_sum + norms
        self.count += len(out)
        return out

    def xnorm(self, accelerator: Any = None) -> Optional[float]:
        """Mean raw-output norm over every process's images (a collective under accelerate: call it on all)."""
        device = next(self.inner.parameters()).device
        total = torch.stack([self.norm_sum if self.norm_sum is not None else torch.zeros((), device=device),
                             torch.tensor(float(self.count), device=device)]).double()
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(total, "sum")
        return float(total[0] / total[1]) if self.raw and total[1] > 0 else None


def embed_bin(model: nn.Module, bins: BinSet, transform: Callable, *, batch_size: int = 128, num_workers: int = 0,
              accelerator: Any = None, progress: bool = False,
              worker_init_fn: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, Optional[float]]:
    """(the 2N mirror-sum embeddings, L2-normalised float32; XNorm) with facesiam's one embedding loop.

    Draws nothing from the torch RNGs (their states are restored): a training run that validates on .bin sets
    trains exactly as one that does not, and resumes bitwise.
    """
    from .embed import embed_dataset

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the loader's iterator seeds its workers from the global RNG
        raw = RawOutputs(model)
        emb, _ = embed_dataset(raw, BinImages(bins, transform), batch_size=batch_size, num_workers=num_workers,
                               flip=True, accelerator=accelerator, progress=progress, worker_init_fn=worker_init_fn)
        return emb, raw.xnorm(accelerator)


# ------------------------------------------------------------------------------------------------ the protocol


def _unit(embeddings: np.ndarray) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def kfold_accuracy(embeddings: np.ndarray, issame: Sequence[bool], *, folds: int = DEFAULT_FOLDS,
                   thresholds: Optional[np.ndarray] = None) -> dict:
    """The field's 10-fold accuracy of pairs (2i, 2i+1): mean, std and each fold's accuracy and threshold."""
    from sklearn.model_selection import KFold

    emb = _unit(embeddings)
    same = np.asarray(issame, dtype=bool)
    if len(emb) != 2 * len(same):
        raise InputError(f"{len(emb)} embeddings for {len(same)} pairs: pairs are rows (2i, 2i+1)")
    if len(same) < folds:
        raise InputError(f"{len(same)} pairs cannot make {folds} folds: a verification set needs >= {folds} pairs")
    thresholds = THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    distance = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    # Every threshold's verdict on every pair at once (T x N booleans, 2.8 M for LFW): each fold's train accuracy
    # is then a sum over the other folds' columns.
    correct = (distance[None, :] < thresholds[:, None]) == same[None, :]
    out = []
    for k, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(distance)):
        best = int(np.argmax(correct[:, train].sum(axis=1)))  # the first best, as np.argmax picks it in the field
        out.append({"fold": k + 1, "accuracy": float(correct[best, test].mean()),
                    "threshold": float(thresholds[best]), "n_pairs": int(len(test))})
    accuracies = [f["accuracy"] for f in out]
    return {"accuracy_mean": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)), "folds": out}


def bin_metrics(embeddings: np.ndarray, issame: Sequence[bool], *, xnorm: Optional[float] = None, name: str = "",
                file: str = "", folds: int = DEFAULT_FOLDS) -> dict:
    """The metrics.json entry of one set: the field's 10-fold accuracy and XNorm, and facesiam's AUC/EER/TAR@FAR."""
    from .verification import score_metrics

    same = np.asarray(issame, dtype=bool)
    out = {"name": name, "file": file, "protocol": PROTOCOL_NOTE, "n_pairs": int(len(same)),
           "n_same": int(same.sum()), "n_different": int((~same).sum()), "xnorm": xnorm}
    out.update(kfold_accuracy(embeddings, same, folds=folds))
    emb = _unit(embeddings)
    out.update(score_metrics(np.einsum("ij,ij->i", emb[0::2], emb[1::2]), same))  # cosine: 1 - distance / 2
    return out


def evaluate_bin(model: nn.Module, bins: BinSet, transform: Callable, *, accelerator: Any = None,
                 **embed_options: Any) -> Optional[dict]:
    """Embed a set (on every process under accelerate) and score it on the main process (others: None)."""
    emb, xnorm = embed_bin(model, bins, transform, accelerator=accelerator, **embed_options)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    return bin_metrics(emb, bins.issame, xnorm=xnorm, name=bins.name, file=bins.path)


def evaluate_bin_files(checkpoint: Union[str, os.PathLike], paths: Union[str, Sequence[str]], *,
                       batch_size: int = 128, num_workers: int = 0, accelerator: Any = None,
                       device: Optional[str] = None, progress: bool = True) -> Optional[dict[str, dict]]:
    """{name: metrics} of each .bin with an exported model (RUN/final, RUN/best); None off the main process."""
    from ..device import resolve_device
    from ..model import eval_transform_for, exported_alignment, load_exported

    sets = [read_bin(p) for p in bin_paths(paths)]  # every file checked before the model is loaded
    dev = accelerator.device if accelerator is not None else resolve_device(device)
    model, cfg = load_exported(checkpoint, device=dev)
    main = accelerator is None or accelerator.is_main_process
    if exported_alignment(checkpoint) is None and main:
        log.warning("%s was trained on unaligned images; .bin sets hold aligned 112x112 crops, so its numbers on "
                    "them are not comparable with aligned models'", checkpoint)
    transform = eval_transform_for(cfg)
    out = {}
    for bins in sets:
        metrics = evaluate_bin(model, bins, transform, accelerator=accelerator, batch_size=batch_size,
                               num_workers=num_workers, progress=progress and main)
        if metrics is not None:
            out[bins.name] = metrics
            log.info("%s", bin_summary_line(bins.name, metrics))
    return out if main else None


# ------------------------------------------------------------------------------------------------ reports


def bin_credit(name: str) -> Optional[str]:
    """The citation of a public set, judged by its name (lfw, cfp_*, agedb_*, calfw, cplfw)."""
    lower = name.lower()
    for key in sorted(BIN_CREDITS, key=len, reverse=True):  # cplfw before lfw
        if lower.startswith(key):
            return BIN_CREDITS[key]
    return None


def _pct(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def bin_summary_line(name: str, m: dict) -> str:
    """``lfw: 99.53 +- 0.31 (10-fold), AUC 0.9990, EER 0.0050, TAR@FAR=1e-3 0.9870, XNorm 22.41``."""
    tar = (m.get("tar_at_far") or {}).get("1e-03")
    parts = [f"{name}: {_pct(m['accuracy_mean'])} +- {_pct(m['accuracy_std'])} ({len(m['folds'])}-fold)",
             "AUC n/a" if m.get("auc") is None else f"AUC {m['auc']:.4f}",
             "EER n/a" if m.get("eer") is None else f"EER {m['eer']:.4f}",
             "TAR@FAR=1e-3 n/a" if tar is None else f"TAR@FAR=1e-3 {tar:.4f}"]
    if m.get("xnorm") is not None:
        parts.append(f"XNorm {m['xnorm']:.2f}")
    return ", ".join(parts)


def bin_report_lines(sets: dict[str, dict]) -> list[str]:
    """The report.md section of the .bin verification sets."""
    lines = ["## Verification sets (.bin)", "",
             f"Protocol of the field: {PROTOCOL_NOTE}. Accuracy in %, mean ± std over the folds; AUC, EER and "
             "TAR@FAR are facesiam's, on the cosine scores of the same pairs.", "",
             "| set | pairs | accuracy (%) | ± std | AUC | EER | TAR@FAR=1e-3 | XNorm |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in sets.items():
        tar = (m.get("tar_at_far") or {}).get("1e-03")
        lines.append(f"| {name} | {m['n_pairs']:,} | {_pct(m['accuracy_mean'])} | {_pct(m['accuracy_std'])} | "
                     + " | ".join("n/a" if v is None else f"{v:.4f}" for v in (m.get("auc"), m.get("eer"), tar))
                     + f" | {'n/a' if m.get('xnorm') is None else format(m['xnorm'], '.2f')} |")
    lines += ["", *(f"- {bin_summary_line(name, m)}" for name, m in sets.items()), ""]
    credits = sorted({c for c in (bin_credit(n) for n in sets) if c})
    if credits:
        lines += ["Data: " + " ".join(credits), ""]
    return lines


def bin_source(checkpoint: Union[str, os.PathLike], paths: Sequence[str]) -> dict:
    """metrics.json's ``source`` for a report on .bin sets alone (no --data)."""
    from datetime import datetime

    from ..model import exported_alignment, read_exported_config

    cfg = read_exported_config(checkpoint)
    alignment = exported_alignment(checkpoint)
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "embeddings": None,
            "checkpoint": str(checkpoint), "data": ",".join(map(str, paths)), "split": None, "flip": True,
            "backbone": cfg.backbone,
            "alignment": "the .bin's aligned crops as they are" if alignment else "none (trained on unaligned images)",
            "embedding_dim": cfg.embedding_dim, "data_credit": None}


# ------------------------------------------------------------------------------------------------ make one


def make_bin(data: Union[str, os.PathLike], pairs_file: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
             split: str = "val", resize: bool = False, progress: bool = True) -> dict:
    """Write a .bin of a data set's pairs (an LFW-format pairs file, e.g. from make_pairs) in the field's layout.

    ``data``: an ImageFolder of aligned 112x112 crops (tools/align_faces.py --size 112) or a shard split. JPEG and
    PNG files are stored byte for byte; other formats are stored as PNG (lossless). An image that is not 112x112 is
    refused unless ``resize`` (then resized and re-encoded: JPEG quality 95 for a JPEG, else PNG).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..data import open_dataset
    from .pairs import ImageNumbers, read_pairs, resolve_pairs

    folds = read_pairs(pairs_file)
    ds = open_dataset(data, split=split)
    resolved = resolve_pairs(folds, ImageNumbers(ds.paths, ds.labels, ds.classes), str(pairs_file))
    rows = np.concatenate(resolved) if resolved else np.zeros((0, 3), np.int64)
    if len(rows) < DEFAULT_FOLDS:
        raise InputError(f"{pairs_file}: {len(rows)} pairs; the protocol's {DEFAULT_FOLDS} folds need at least "
                         f"{DEFAULT_FOLDS} (make_pairs --pairs-per-fold)")
    read = ds.read_bytes if hasattr(ds, "read_bytes") else (lambda i: (Path(ds.root) / ds.paths[i]).read_bytes())
    stored: dict[int, bytes] = {}
    counts = {"resized": 0, "reencoded": 0}

    def encoded(row: int) -> bytes:
        if row in stored:
            return stored[row]
        raw, where = read(row), f"{data}/{ds.paths[row]}"
        try:
            with Image.open(io.BytesIO(raw)) as im:
                size, fmt = im.size, im.format
                if size != (BIN_SIZE, BIN_SIZE):
                    if not resize:
                        raise InputError(f"{where} is {size[0]}x{size[1]}, not {BIN_SIZE}x{BIN_SIZE}: .bin sets hold "
                                         f"aligned {BIN_SIZE}x{BIN_SIZE} crops; align the folder (tools/align_faces.py "
                                         f"--size {BIN_SIZE}) or pass --resize")
                    im = im.convert("RGB").resize((BIN_SIZE, BIN_SIZE), Image.BICUBIC)
                    counts["resized"] += 1
                    fmt_out = "JPEG" if fmt == "JPEG" else "PNG"
                elif fmt not in ("JPEG", "PNG"):
                    im = im.convert("RGB")
                    counts["reencoded"] += 1
                    fmt_out = "PNG"
                else:
                    fmt_out = None
                if fmt_out is not None:
                    buf = io.BytesIO()
                    im.save(buf, fmt_out, **({"quality": 95} if fmt_out == "JPEG" else {}))
                    raw = buf.getvalue()
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 -- PIL raises several types for unreadable files
            raise InputError(f"{where}: not a readable image ({err}); remove it or pick pairs without it") from None
        stored[row] = raw
        return raw

    images, issame = [], []
    for a, b, same in tqdm(rows.tolist(), desc="make .bin", unit="pair", disable=not progress):
        images += [encoded(a), encoded(b)]
        issame.append(bool(same))
    write_bin(out, images, issame)
    return {"out": str(out), "n_pairs": len(issame), "n_same": int(sum(issame)), "n_images": len(stored),
            **counts, "bytes": Path(out).stat().st_size}
