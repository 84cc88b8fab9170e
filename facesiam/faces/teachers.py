"""Face-embedding teachers for knowledge distillation: pretrained face-recognition networks behind one interface.

A teacher embeds each training photo once (the training code caches the result under its ``fingerprint()``):

    teacher = build_teacher("dlib")                    # or "onnx:/path/model.onnx" (+ size/mean/std/align)
    prepared = teacher.prepare(photo, landmarks)       # the teacher's own face detection and crop, per photo
    embeddings = teacher.embed([p.input for p in prepared_list if p.input is not None])   # (n, dim), unit rows

``prepare`` starts from the original RGB photo, because every teacher crops faces its own way. ``landmarks`` are
the 5 points of facesiam's alignment record (MTCNN, template order: left eye, right eye, nose tip, left and right
mouth corner, "left" = image left; pixel-index coordinates in the photo, see template.py): the fallback when the
teacher's own detector finds no face. ``Prepared.found_by`` says which path made the input.

* ``dlib``: dlib's ResNet face descriptor (128-d; weights in the ``face_recognition_models`` package, public
  domain) on its own pipeline: HOG detector (upsample 1), 5-point shape predictor, 150 px chip with padding 0.25.
  Install with ``pip install 'facesiam[teacher-dlib]'``; both packages are imported only when it is built.
* ``onnx:PATH``: any ONNX face embedder. A facesiam export (``facesiam export --onnx``) configures itself from
  its metadata; any other file needs ``size``, ``mean``, ``std`` and ``align`` (``TEACHER_ALIGN_CHOICES``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, Sequence

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

from ..errors import InputError
from ..fileio import sha256_file
from ..onnx_session import METADATA_KEY, open_session
from ..registry import Registry
from .detectors import package_version
from .template import TEMPLATE_SIZE, estimate_transform, warp

TEACHERS = Registry("teacher")
TEACHER_ALIGN_CHOICES = ("arcface112", "none")
SPEC_CHOICES = "dlib, onnx:PATH"
FOUND_BY = ("teacher", "landmarks", "none")


@dataclass
class Prepared:
    """One photo made ready for a teacher."""

    input: Optional[np.ndarray]
    """The teacher's input for the photo (whatever its ``embed`` takes); None: no face."""
    found_by: str
    """"teacher" (its own detector or preprocessing), "landmarks" (the given 5 points) or "none" (no face)."""


class Teacher(Protocol):
    """What the distillation code needs of a teacher."""

    name: str
    """"dlib" or "onnx:/absolute/path.onnx"."""
    dim: int
    """Embedding size."""

    def fingerprint(self) -> dict:
        """JSON-able: everything that changes the embeddings (name, weights' sha256, preprocessing, versions)."""

    def prepare(self, image: Image.Image, landmarks: Optional[np.ndarray] = None) -> Prepared:
        """The teacher's input for one original RGB photo; ``landmarks`` (5x2) are the fallback."""

    def embed(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Inputs from ``prepare`` -> (n, dim) float32, each row L2-normalised."""

    def mirror(self, input: np.ndarray) -> np.ndarray:
        """An input from ``prepare``, left and right swapped (the mirror image of the photo's face)."""


def build_teacher(spec: str, *, size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, align: Optional[str] = None,
                  threads: Optional[int] = None, mirror: bool = False) -> Teacher:
    """The teacher ``spec`` names: "dlib" or "onnx:PATH" (an unknown spec is a one-line error listing both).

    size, mean, std, align: an ONNX teacher's preprocessing (required unless the file is a facesiam export);
    threads: onnxruntime's intra-op threads (dlib runs on one thread); mirror: embed each face with its mirror
    image (MirroredTeacher).
    """
    kind, sep, arg = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "dlib" and not sep:
        given = [flag for flag, value in (("--teacher-size", size), ("--teacher-mean", mean),
                                          ("--teacher-std", std), ("--teacher-align", align)) if value is not None]
        if given:
            raise InputError(f"teacher dlib crops and normalises faces its own way: drop {', '.join(given)}")
        teacher = TEACHERS.get("dlib").build(threads=threads)
    elif kind == "onnx" and arg.strip():
        teacher = TEACHERS.get("onnx").build(arg.strip(), size=size, mean=mean, std=std, align=align, threads=threads)
    else:
        raise InputError(f"unknown teacher {spec!r}; choose one of {SPEC_CHOICES}")
    return MirroredTeacher(teacher) if mirror else teacher


class MirroredTeacher:
    """A teacher that embeds each face with its mirror image: the sum of the two embeddings, unit length (what
    ``evaluate --flip`` does for a student). One more network pass per face and no second detection (the mirror
    of the prepared input). dlib on LFW's held-out people (1,220 photos, 2026-12-07): TAR@FAR=1e-3 0.9362 ->
    0.9479, rank-1 0.9674 -> 0.9756, pairs 0.9810 -> 0.9840: better distillation targets (distill.teacher_mirror).
    Its own fingerprint, so its cache is apart from the plain teacher's."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.name, self.dim = teacher.name, teacher.dim

    @property
    def same_person_threshold(self) -> Optional[float]:
        """The plain teacher's (the doctor's default): the sum moves same-person cosines up by less than their
        spread (dlib on LFW: 0.991 mean cosine between a face's two embeddings)."""
        return getattr(self.teacher, "same_person_threshold", None)

    def fingerprint(self) -> dict:
        return {**self.teacher.fingerprint(), "mirror": True}

    def prepare(self, image: Image.Image, landmarks: Optional[np.ndarray] = None) -> Prepared:
        return self.teacher.prepare(image, landmarks)

    def embed(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        inputs = list(inputs)
        return unit_rows(self.teacher.embed(inputs) + self.teacher.embed([self.teacher.mirror(x) for x in inputs]))

    def mirror(self, input: np.ndarray) -> np.ndarray:
        return self.teacher.mirror(input)


def embed_photos(teacher: Teacher, photos: Iterable[tuple[Image.Image, Optional[np.ndarray]]], count: int,
                 batch_size: int) -> tuple[np.ndarray, list[str]]:
    """The teacher's embedding of each of ``count`` (photo, landmarks or None) pairs, prepared one by one and
    embedded ``batch_size`` at a time: (count x dim float32, zero rows where no face; each photo's found_by). The
    one loop of the teacher pass (shards) and of the doctor on a photo folder."""
    emb = np.zeros((count, teacher.dim), np.float32)
    found_by = ["none"] * count
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            emb[[j for j, _ in pending]] = teacher.embed([x for _, x in pending])
            pending.clear()

    for j, (image, landmarks) in enumerate(photos):
        prepared = teacher.prepare(image, landmarks)
        found_by[j] = prepared.found_by
        if prepared.input is not None:
            pending.append((j, prepared.input))
            if len(pending) >= batch_size:
                flush()
    flush()
    return emb, found_by


# ------------------------------------------------------------------------------------------ shared helpers

def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_landmarks(landmarks: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The 5 landmarks as a 5x2 float64 array (None stays None); anything else is a one-line error."""
    if landmarks is None:
        return None
    points = np.asarray(landmarks, np.float64)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise InputError(f"landmarks must be 5x2 finite pixel coordinates (MTCNN order), got shape {points.shape}")
    return points


def similarity_onto(landmarks: np.ndarray, points: np.ndarray) -> Optional[SimilarityTransform]:
    """The least-squares similarity transform from ``landmarks`` onto ``points`` (as template.estimate_transform
    does for the ArcFace template), or None when the landmarks are degenerate."""
    tform = SimilarityTransform.from_estimate(landmarks, points)
    return tform if tform else None  # skimage returns a falsy FailedEstimation instead of raising


# ------------------------------------------------------------------------------------------ dlib

DLIB_DIM = 128
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25
DLIB_UPSAMPLE = 1  # the detector's upsampling: faces down to ~40 px (dlib's and face_recognition's default)
DLIB_BATCH = 32
DLIB_INSTALL_HINT = "teacher dlib needs dlib and face_recognition_models: pip install 'facesiam[teacher-dlib]'"
DLIB_WEIGHTS = {"descriptor": "dlib_face_recognition_resnet_model_v1.dat",
                "shape_predictor": "shape_predictor_5_face_landmarks.dat"}

# Where the 5 MTCNN landmarks sit in dlib's 150 px, padding-0.25 chip: the fallback maps them there.
#
# Derived from dlib's own mean face (dlib/image_transforms/interpolation.h, get_face_chip_details: mean_face_shape
# of points 17-67 of the 68-point markup; its 5-point branch uses the same positions for the eye corners and the
# nose base). A mean-face point m in [0, 1] lands at chip pixel index (padding + m) / (1 + 2 padding) * (size - 1)
# (get_mapping_to_chip maps template coordinates [0, size] onto pixel indices [0, size - 1]). Eye = mean of the
# eye's two corners (36, 39 / 42, 45), nose tip = 30, mouth corners = 48, 54:
DLIB_MEAN_FACE_CHIP = np.array([[47.50, 47.09], [99.54, 47.09], [73.52, 76.05], [50.08, 102.34], [96.96, 102.34]])
# Checked on LFW photos where dlib finds the face, by mapping facesiam's MTCNN landmarks through dlib's own chip
# transform (dlib.get_face_chip_details): MTCNN marks the pupils ~1.5 px above the corners' mean and the mouth
# corners ~3.5 px lower and a little wider than the 68-point markup. The points used are those measured means
# (100 photos) -- the landmarks always come from MTCNN here, so its convention is the one to match:
DLIB_CHIP_LANDMARKS = np.array([[47.52, 45.36], [101.79, 45.69], [75.25, 78.06], [50.28, 105.91], [97.72, 106.10]])
# Cosine of the fallback's embedding to dlib's own, on 100 other LFW photos (lfw-devtrain, random order with seed
# 0, disjoint from the 100 that gave the points; dlib 20.0.1; MTCNN's face nearest dlib's): these points mean
# 0.9947, min 0.9755 (5th percentile 0.9898); the mean-face points above mean 0.9916, min 0.9646; dlib's own 5
# points through this warp (the warp's share of the gap) mean 0.9990, min 0.9842.
# Speed on one CPU thread (dlib's detector + chip, and its network alone): docs/benchmarks.md, "Distillation".
DLIB_FALLBACK = "mtcnn5-onto-dlib-chip-v1"  # changes when DLIB_CHIP_LANDMARKS or the warp change


def load_dlib() -> tuple[Any, dict[str, Path]]:
    """The dlib module and the weight files of face_recognition_models (a one-line error when either is missing).

    face_recognition_models is located, not imported: its __init__ imports pkg_resources, which setuptools >= 81
    no longer ships, and all it offers is the paths of its data files.
    """
    try:
        import dlib
    except ImportError:
        raise InputError(DLIB_INSTALL_HINT) from None
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):  # ValueError: a sys.modules entry without a spec
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = {key: Path(folders[0]) / "models" / name for key, name in DLIB_WEIGHTS.items()} if folders else {}
    if not files or not all(f.is_file() for f in files.values()):
        raise InputError(DLIB_INSTALL_HINT)
    return dlib, files


@TEACHERS.register("dlib", doc="dlib's ResNet face descriptor (128-d), its own detector and chip; "
                               "MTCNN landmarks when it finds no face")
class DlibTeacher:
    """dlib's face descriptor on dlib's own pipeline, with the given landmarks as the fallback."""

    name = "dlib"
    dim = DLIB_DIM
    # Cosine of the unit descriptors at FAR 1e-3 on LFW's View-1 training people (4M impostor pairs, 2026-12-05;
    # docs/curate.md): what doctor and cluster use when no evaluation report is given
    same_person_threshold = 0.9266

    def __init__(self, threads: Optional[int] = None, batch_size: int = DLIB_BATCH):
        # threads: part of build_teacher's interface; dlib's CPU network runs on one thread whatever it says
        self.dlib, self.files = load_dlib()
        self.batch_size = batch_size
        self.detector = self.dlib.get_frontal_face_detector()
        self.predictor = self.dlib.shape_predictor(str(self.files["shape_predictor"]))
        self.model = self.dlib.face_recognition_model_v1(str(self.files["descriptor"]))
        self._fingerprint: Optional[dict] = None

    def __reduce__(self) -> tuple:
        """Pickled as how to build it again (dlib's objects do not pickle): the teacher pass's helper processes."""
        return DlibTeacher, (None, self.batch_size)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = {
                "name": self.name, "dim": self.dim, "dlib": self.dlib.__version__, "pillow": package_version("pillow"),
                **{f"{key}_sha256": sha256_file(path) for key, path in sorted(self.files.items())},
                "detector": f"frontal_face_detector, upsample {DLIB_UPSAMPLE}", "chip_size": DLIB_CHIP_SIZE,
                "chip_padding": DLIB_CHIP_PADDING, "fallback": DLIB_FALLBACK,
                "fallback_points": DLIB_CHIP_LANDMARKS.tolist(), "normalised": True}
        return dict(self._fingerprint)

    def prepare(self, image: Image.Image, landmarks: Optional[np.ndarray] = None) -> Prepared:
        """dlib's 150x150 uint8 chip of the face: dlib's own detection (several faces: the one nearest the
        landmarks' centre, else the largest), else the landmarks mapped onto the chip, else none."""
        landmarks = check_landmarks(landmarks)
        image = image.convert("RGB")
        pixels = np.ascontiguousarray(np.asarray(image, np.uint8))
        boxes = list(self.detector(pixels, DLIB_UPSAMPLE))
        if boxes:
            shape = self.predictor(pixels, self._choose(boxes, landmarks))
            chip = self.dlib.get_face_chip(pixels, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING)
            return Prepared(np.ascontiguousarray(chip, np.uint8), "teacher")
        tform = similarity_onto(landmarks, DLIB_CHIP_LANDMARKS) if landmarks is not None else None
        if tform is None:
            return Prepared(None, "none")
        # warp: bilinear, black outside the photo (box-filtered first for a face over twice the chip), like dlib's
        # pyramid + bilinear extract_image_chip
        return Prepared(np.asarray(warp(image, tform, DLIB_CHIP_SIZE), np.uint8), "landmarks")

    @staticmethod
    def _choose(boxes: list, landmarks: Optional[np.ndarray]) -> Any:
        if landmarks is None:
            return max(boxes, key=lambda r: r.area())
        middle = landmarks.mean(axis=0)
        return min(boxes, key=lambda r: float((r.center().x - middle[0]) ** 2 + (r.center().y - middle[1]) ** 2))

    def embed(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        chips = [np.ascontiguousarray(x, np.uint8) for x in inputs]
        for chip in chips:
            if chip.shape != (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3):
                raise InputError(f"teacher dlib embeds {DLIB_CHIP_SIZE}x{DLIB_CHIP_SIZE}x3 chips from its prepare(), "
                                 f"got shape {chip.shape}")
        out = [np.array([np.asarray(v) for v in self.model.compute_face_descriptor(chips[i:i + self.batch_size])])
               for i in range(0, len(chips), self.batch_size)]
        # Unit length: distillation compares directions (cosine). dlib's own metric is the euclidean distance of the
        # raw descriptors (same person below 0.6); their norms are all close to 1 anyway.
        return unit_rows(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    @staticmethod
    def mirror(input: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(input[:, ::-1])  # a height x width x 3 chip


# ------------------------------------------------------------------------------------------ ONNX

ONNX_BATCH = 64
ONNX_FLAGS = {"size": "--teacher-size", "mean": "--teacher-mean", "std": "--teacher-std", "align": "--teacher-align"}


def open_onnx_session(path: Path, threads: Optional[int] = None) -> Any:
    """An onnxruntime session on ``path`` (one-line errors for a missing, unreadable or non-ONNX file)."""
    return open_session(path, threads=threads, needs="an ONNX teacher",
                        missing_hint="pass --teacher onnx:PATH with an existing .onnx file",
                        unreadable_hint="pass an ONNX face embedder as --teacher onnx:PATH")


def onnx_preprocessing(path: Path, meta: Optional[dict], **given: Any) -> dict[str, Any]:
    """size, mean, std, align (+ align_size, center_crop) from a facesiam export's metadata or from ``given``.

    A facesiam export's aligned faces are warped at the alignment's size and then resized (and centre-cropped) to
    the network's input as in training; other files are warped straight at ``size``.
    """
    if meta is not None:
        alignment = meta.get("alignment") or None
        if alignment and (alignment.get("template") or {}).get("name", "arcface") != "arcface":
            raise InputError(f"{path}: aligned onto template {alignment['template'].get('name')!r}; "
                             "an ONNX teacher aligns onto the ArcFace template only")
        found = {"size": int(meta["image_size"]), "mean": [float(v) for v in meta["mean"]],
                 "std": [float(v) for v in meta["std"]], "align": "arcface112" if alignment else "none"}
        clash = [f"{ONNX_FLAGS[k]} {given[k]}" for k in found if given[k] is not None and _differs(given[k], found[k])]
        if clash:
            raise InputError(f"{path} is a facesiam export that sets its own preprocessing ({found}): drop "
                             f"{', '.join(clash)}")
        return {**found, "align_size": int(alignment.get("size", TEMPLATE_SIZE)) if alignment else None,
                "center_crop": meta.get("center_crop") or None}
    missing = [flag for key, flag in ONNX_FLAGS.items() if given[key] is None]
    if missing:
        raise InputError(f"{path} has no facesiam metadata: pass {', '.join(missing)} (its input size, RGB mean and "
                         f"std on [0, 1], and alignment: one of {', '.join(TEACHER_ALIGN_CHOICES)})")
    size, mean, std, align = int(given["size"]), given["mean"], given["std"], given["align"]
    if size < 8:
        raise InputError(f"--teacher-size must be >= 8 pixels, got {size}")
    if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
        raise InputError(f"--teacher-mean and --teacher-std take 3 values each (RGB, std > 0), got {mean} and {std}")
    if align not in TEACHER_ALIGN_CHOICES:
        raise InputError(f"--teacher-align must be one of {', '.join(TEACHER_ALIGN_CHOICES)}, got {align!r}")
    return {"size": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std], "align": align,
            "align_size": size if align == "arcface112" else None, "center_crop": None}


def _differs(value: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return len(list(value)) != len(expected) or not np.allclose(np.asarray(value, np.float64), expected)
    return str(value) != str(expected)


def check_onnx_io(path: Path, session: Any, size: int) -> tuple[str, Optional[int], Optional[int]]:
    """(input name, fixed batch or None, output size or None) after checking the model takes (N, 3, size, size)
    float images and returns (N, D) embeddings (one-line errors naming the fix)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    fixed = [d if isinstance(d, int) else None for d in shape]
    if len(inputs) != 1 or len(shape) != 4 or fixed[1] not in (3, None) or inputs[0].type != "tensor(float)":
        described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise InputError(f"{path}: a teacher takes one float32 image batch (N, 3, H, W), this model takes {described}; "
                         "export the embedder with such an input")
    if any(d is not None and d != size for d in fixed[2:]):
        raise InputError(f"{path}: input {inputs[0].name} is fixed at {shape[2]}x{shape[3]} pixels, not {size}; "
                         f"pass --teacher-size {shape[2] if shape[2] == shape[3] else 'matching it'}")
    out_shape = list(outputs[0].shape or [])
    if len(out_shape) != 2:
        raise InputError(f"{path}: output {outputs[0].name} has shape {out_shape}; a teacher must output one "
                         "embedding per image (N, D): pass the embedder's ONNX, not a classifier or detector")
    return inputs[0].name, fixed[0], out_shape[1] if isinstance(out_shape[1], int) else None


@TEACHERS.register("onnx", doc="any ONNX face embedder (onnx:PATH); a facesiam export configures itself")
class OnnxTeacher:
    """An ONNX face embedder on onnxruntime, fed CHW float32 RGB images normalised by mean/std."""

    def __init__(self, path: str | Path, *, size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, align: Optional[str] = None, threads: Optional[int] = None,
                 batch_size: int = ONNX_BATCH):
        self.path = Path(path).expanduser().resolve()
        self.name = f"onnx:{self.path}"
        self.session = open_onnx_session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.meta = json.loads(meta) if meta else None
        self.config = onnx_preprocessing(self.path, self.meta, size=size, mean=mean, std=std, align=align)
        self.size, self.align = self.config["size"], self.config["align"]
        self.input_name, self.fixed_batch, dim = check_onnx_io(self.path, self.session, self.size)
        self.batch_size = self.fixed_batch or batch_size
        self._mean = np.asarray(self.config["mean"], np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.config["std"], np.float32).reshape(3, 1, 1)
        self.dim = dim or self._run(np.zeros((1, 3, self.size, self.size), np.float32)).shape[1]
        self._aligner: Any = None
        self._sha256: Optional[str] = None
        self._given = {"size": size, "mean": mean, "std": std, "align": align, "threads": threads,
                       "batch_size": batch_size}

    def __reduce__(self) -> tuple:
        """Pickled as how to build it again (a session does not pickle): the teacher pass's helper processes."""
        return functools.partial(OnnxTeacher, self.path, **self._given), ()

    def fingerprint(self) -> dict:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        landmarks_from = ({"detector": "mtcnn", "facenet-pytorch": package_version("facenet-pytorch")}
                          if self.align == "arcface112" else {})
        return {"name": self.name, "path": str(self.path), "sha256": self._sha256, "dim": self.dim, **self.config,
                **landmarks_from, "onnxruntime": package_version("onnxruntime"), "pillow": package_version("pillow")}

    def prepare(self, image: Image.Image, landmarks: Optional[np.ndarray] = None) -> Prepared:
        """align "none": the whole photo (found_by "teacher"); "arcface112": the face warped onto the ArcFace
        template from the given landmarks, else from facesiam's MTCNN (the largest whole face), else none."""
        landmarks = check_landmarks(landmarks)
        image = image.convert("RGB")
        if self.align == "none":
            return Prepared(self.to_input(image), "teacher")
        side = self.config["align_size"]
        if landmarks is not None:
            try:
                return Prepared(self.to_input(warp(image, estimate_transform(landmarks, side), side)), "landmarks")
            except InputError:  # degenerate points: let the detector look instead
                pass
        crop = self.aligner.align(image).image
        return Prepared(None, "none") if crop is None else Prepared(self.to_input(crop), "teacher")

    @property
    def aligner(self) -> Any:
        """facesiam's MTCNN aligner at the alignment size, built on first use (a torch model)."""
        if self._aligner is None:
            from .aligner import FaceAligner

            self._aligner = FaceAligner(size=self.config["align_size"], multi="largest", on_no_face="skip")
        return self._aligner

    def to_input(self, image: Image.Image) -> np.ndarray:
        """RGB image -> 3 x size x size float32: [centre crop], bilinear resize, /255, mean/std (as OnnxEmbedder)."""
        fraction = self.config["center_crop"]
        if fraction:
            side = max(1, round(fraction * min(image.size)))
            left = int(round((image.width - side) / 2.0))  # torchvision's center_crop rounding
            top = int(round((image.height - side) / 2.0))
            image = image.crop((left, top, left + side, top + side))
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self._mean) / self._std

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.fixed_batch and n < self.fixed_batch:  # a model exported with a fixed batch: pad the last one
            batch = np.concatenate([batch, np.zeros((self.fixed_batch - n,) + batch.shape[1:], batch.dtype)])
        out = np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0], np.float32)
        if out.ndim != 2:
            raise InputError(f"{self.path}: output has shape {out.shape}; a teacher must output (N, D) embeddings")
        return out[:n]

    def embed(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        if not len(inputs):
            return np.zeros((0, self.dim), np.float32)
        shape = (3, self.size, self.size)
        bad = [np.shape(x) for x in inputs if np.shape(x) != shape]
        if bad:
            raise InputError(f"{self.name} embeds {shape} inputs from its prepare(), got shape {bad[0]}")
        out = [self._run(np.stack(inputs[i:i + self.batch_size]).astype(np.float32, copy=False))
               for i in range(0, len(inputs), self.batch_size)]
        return unit_rows(np.concatenate(out))

    @staticmethod
    def mirror(input: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(input[..., ::-1])  # 3 x size x size
