"""Face detection and 5-point alignment: raw photos -> 112x112 crops aligned like ArcFace's training data.

* Detector: MTCNN from facenet-pytorch (MIT; its wheel ships the P/R/O-net weights, so nothing is downloaded).
  Its metadata pins torch<2.3 but it runs unchanged on newer torch, so it is installed without its
  dependencies: ``pip install --no-deps facenet-pytorch``. It is imported only when a FaceAligner is made.
* Alignment: the similarity transform (rotation, uniform scale, translation) that maps the 5 detected points
  onto the ArcFace template in the least-squares sense (skimage's ``SimilarityTransform``, Umeyama's method, as
  insightface's ``norm_crop`` does), then a bilinear warp with PIL onto a black background.
* Images are read with facesiam.data.images.load_rgb, so EXIF rotation, CMYK, 16-bit, palette and grey files
  are handled exactly as the shard writer handles them, before detection.

``align_folder`` turns an ImageFolder of raw photos into an aligned ImageFolder (PNG crops) plus
``alignment.json``: how it was aligned (``alignment_info``) and, for every source image, what happened to it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
from skimage.transform import SimilarityTransform

from ..errors import InputError
from ..fileio import staged_directory, write_text
from .folder import available_cpus, check_destination, list_image_folder, printable_name
from .images import BadImage, load_rgb
from .readers import _FaceDataset

log = logging.getLogger("facesiam.align")

# -----------------------------------------------------------------------------
# The ArcFace / insightface template (112x112 output): left eye, right eye, nose tip, left and right mouth
# corner, in pixel-index coordinates ("left" = the image's left, the person's right eye).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_SIZE = 112
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
MULTI_CHOICES = ("largest", "central")
NO_FACE_CHOICES = ("skip", "center")
STATUSES = ("aligned", "center", "skipped")
SKIP_KINDS = ("no_face", "too_small", "cut_off", "unreadable", "error")
MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults for the P, R and O stages
MTCNN_FACTOR = 0.709  # image pyramid step (its default)
BORDER = (0, 0, 0)  # pixels the warp takes from outside the photo are black, as in insightface (borderValue=0)
INSTALL_HINT = "pip install --no-deps facenet-pytorch"
ALIGNMENT_FILE = "alignment.json"
FORMAT = "facesiam-aligned"
FORMAT_VERSION = 1
# Crops are PNG: lossless, so a later make_shards stores their bytes untouched and the pixels are exactly what
# the warp made (a JPEG would add a second lossy generation on top of the source's). Costs ~4x the bytes of JPEG q95
# (LFW crops: 20 kB vs 5 kB).
OUTPUT_EXT = ".png"
PNG_COMPRESS_LEVEL = 1  # zlib level 1: 1.2 ms a crop instead of 4.2 ms at PIL's default 6, files ~2 % larger
CPU_BATCH = 16  # images per MTCNN call on CPU: 20-30 % faster than one at a time on one thread (bench_align)
GPU_BATCH = 64
# -----------------------------------------------------------------------------


def arcface_template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 5 template points (5x2, pixel-index coordinates) for a ``size`` x ``size`` crop: scaled by size/112."""
    return ARCFACE_TEMPLATE_112 * (size / TEMPLATE_SIZE)


@dataclass
class Face:
    """One detection: box (x0, y0, x1, y1), MTCNN score and the 5 landmarks (5x2, in template order)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """The box's longer side: MTCNN's min_face_size refers to its square search windows."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def center(self) -> np.ndarray:
        return (self.box[:2] + self.box[2:]) / 2


@dataclass
class AlignResult:
    """What happened to one image. ``image`` is the aligned (or centre-cropped) crop, None when skipped."""

    image: Optional[Image.Image]
    status: str  # "aligned" | "center" | "skipped"
    reason: Optional[str] = None  # why skipped or centre-cropped, or which of several faces was kept
    box: Optional[list[float]] = None  # the kept face's box (x0, y0, x1, y1) in the source image
    score: Optional[float] = None
    landmarks: Optional[list[list[float]]] = None  # 5x2, source image coordinates
    faces: int = 0  # faces the detector found (any size)
    skip: Optional[str] = None  # when skipped, why in one word: one of SKIP_KINDS

    def record(self) -> dict[str, Any]:
        """JSON-ready fields (no image), rounded: 1/100 pixel is far below the detector's precision."""
        out = {k: v for k, v in asdict(self).items() if k != "image"}
        if self.box is not None:
            out["box"] = [round(v, 2) for v in self.box]
        if self.landmarks is not None:
            out["landmarks"] = [[round(x, 2), round(y, 2)] for x, y in self.landmarks]
        if self.score is not None:
            out["score"] = round(self.score, 5)
        return out


def estimate_transform(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> SimilarityTransform:
    """Least-squares similarity transform from the 5 landmarks (pixel-index coordinates) onto the template.

    Raises InputError when the points are degenerate (e.g. all equal), so no transform exists.
    """
    tform = SimilarityTransform.from_estimate(np.asarray(landmarks, np.float64).reshape(5, 2), arcface_template(size))
    if not tform:  # skimage returns a falsy FailedEstimation instead of raising
        raise InputError(f"cannot align: no similarity transform fits these landmarks ({tform})")
    return tform


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def warp(image: Image.Image, tform: SimilarityTransform, size: int = TEMPLATE_SIZE) -> Image.Image:
    """Warp ``image`` with ``tform`` (source -> crop, pixel-index coordinates) into a ``size`` x ``size`` crop.

    Bilinear like insightface's cv2.warpAffine. A bilinear warp samples 4 pixels, so a face more than twice the
    crop's size would alias; the photo is then first shrunk by an integer factor with a box filter
    (PIL's reduce), only over the region the crop covers.
    """
    inverse = np.linalg.inv(tform.params)  # crop index -> source index
    factor = max(1, int(0.5 / tform.scale))  # leaves the warp itself scaling by >= 0.5
    # PIL samples in continuous coordinates (pixel i spans [i, i+1)); landmarks and the template are pixel
    # indices (pixel i centred at i), as in cv2 and insightface: convert at both ends.
    to_source = _shift(0.5, 0.5) @ inverse @ _shift(-0.5, -0.5)
    if factor > 1:
        corners = to_source @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], np.float64)
        (x0, x1), (y0, y1) = ((int(np.floor(c.min())) - factor, int(np.ceil(c.max())) + factor) for c in corners[:2])
        box = (max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1))
        if box[2] > box[0] and box[3] > box[1]:  # PIL rounds a partial last block up (averaging fewer pixels)
            image = image.reduce(factor, box=box)
            to_source = np.diag([1 / factor, 1 / factor, 1.0]) @ _shift(-box[0], -box[1]) @ to_source
    coeffs = tuple(to_source[:2].ravel())
    return image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                           fillcolor=BORDER)


def center_crop(image: Image.Image, size: int = TEMPLATE_SIZE) -> Image.Image:
    """The central square of the shorter side, resized to ``size`` (the fallback when no face is found)."""
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)


def load_mtcnn(device: str = "cpu", min_face_size: int = 20) -> Any:
    """facenet-pytorch's MTCNN with its shipped weights, returning every face (selection is done here)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise InputError(f"face alignment needs facenet-pytorch, which is not installed: {INSTALL_HINT} "
                         f"(--no-deps: its metadata pins an old torch, but it runs on this one)") from None
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but torch sees no CUDA GPU; use device 'cpu'")
    return MTCNN(min_face_size=min_face_size, thresholds=list(MTCNN_THRESHOLDS), factor=MTCNN_FACTOR,
                 keep_all=True, select_largest=False, device=torch.device(device))


def _as_faces(boxes: Any, probs: Any, points: Any) -> list[Face]:
    """One image's detections from MTCNN.detect as Faces.

    MTCNN packs its results into numpy object arrays: (n_images, n_faces, 4) of Python floats when every image
    has the same number of faces, a 1-D array of per-image arrays when the counts differ, None for an image
    without faces. Converting each image's entry on its own handles every case.
    """
    if boxes is None or probs is None or points is None:
        return []
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    probs = np.asarray(probs, np.float64).reshape(-1)
    points = np.asarray(points, np.float64).reshape(-1, 5, 2)
    return [Face(b, float(s), p) for b, s, p in zip(boxes, probs, points)]


def _inside(points: np.ndarray, image_size: tuple[int, int]) -> bool:
    """Whether every point lies on the image (pixel-index coordinates)."""
    return bool(np.all(points >= -0.5) and np.all(points <= np.asarray(image_size, np.float64) - 0.5))


class FaceAligner:
    """Detect faces with MTCNN and align one per image onto the ArcFace template.

    size: output crop side in pixels (the template is scaled by size/112).
    device: "cpu" or "cuda" (MTCNN's forward passes; the warp runs on the CPU).
    min_face_size: smallest face searched for and kept, in source pixels (the box's longer side).
    multi: which face to keep when there are several: the "largest" box, or the "central" one (box centre
        nearest the image centre).
    on_no_face: "skip" an image without a face, or crop its "center" instead (status "center"). Faces
        smaller than min_face_size, faces cut off by the image border (a landmark outside it) and images
        smaller than min_face_size are always skipped.
    batch_size: images per MTCNN call (same-sized images are batched; default 16 on CPU, 64 on GPU).
    """

    def __init__(self, size: int = TEMPLATE_SIZE, device: str = "cpu", min_face_size: int = 20,
                 multi: str = "largest", on_no_face: str = "skip", batch_size: Optional[int] = None):
        if size < 8:
            raise InputError(f"alignment size must be >= 8 pixels, got {size}")
        if min_face_size < 12:  # MTCNN's smallest window is 12 px; below it the pyramid would enlarge the photo
            raise InputError(f"min_face_size must be >= 12 pixels (MTCNN's smallest window), got {min_face_size}")
        if multi not in MULTI_CHOICES:
            raise InputError(f"multi must be one of {', '.join(MULTI_CHOICES)}, got {multi!r}")
        if on_no_face not in NO_FACE_CHOICES:
            raise InputError(f"on_no_face must be one of {', '.join(NO_FACE_CHOICES)}, got {on_no_face!r}")
        self.size, self.device, self.min_face_size = size, device, min_face_size
        self.multi, self.on_no_face = multi, on_no_face
        self.batch_size = batch_size or (GPU_BATCH if device.startswith("cuda") else CPU_BATCH)
        self.mtcnn = load_mtcnn(device, min_face_size)

    # ------------------------------------------------------------------ detection

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """All faces in each image. Same-sized images go through MTCNN together (it only batches equal sizes)."""
        found: list[list[Face]] = [[] for _ in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if min(img.size) >= self.min_face_size:  # smaller: MTCNN's pyramid would be empty (it would crash)
                by_size.setdefault(img.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                part = indices[start:start + self.batch_size]
                boxes, probs, points = self.mtcnn.detect([images[i] for i in part], landmarks=True)
                for k, i in enumerate(part):
                    found[i] = _as_faces(boxes[k], probs[k], points[k])
        return found

    def detect(self, image: Image.Image) -> list[Face]:
        return self.detect_batch([image])[0]

    # ------------------------------------------------------------------ alignment

    def choose(self, faces: Sequence[Face], image_size: tuple[int, int]) -> Face:
        """The face ``multi`` asks for among ``faces`` (not empty)."""
        if self.multi == "largest":
            return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        middle = np.asarray(image_size, np.float64) / 2
        return min(faces, key=lambda f: float(np.sum((f.center - middle) ** 2)))

    def align_faces(self, image: Image.Image, faces: Sequence[Face]) -> AlignResult:
        """The result for ``image`` given its detections (what align_batch does after detection)."""
        if min(image.size) < self.min_face_size:
            return AlignResult(None, "skipped", f"image too small: {image.width}x{image.height} < min_face_size "
                                                f"{self.min_face_size}", skip="too_small")
        if not faces:
            if self.on_no_face == "center":
                return AlignResult(center_crop(image, self.size), "center", "no face found: centre crop")
            return AlignResult(None, "skipped", "no face found", skip="no_face")
        usable = [f for f in faces if f.size >= self.min_face_size]
        if not usable:
            biggest = max(f.size for f in faces)
            return AlignResult(None, "skipped", f"face too small: {biggest:.0f} px < min_face_size "
                                                f"{self.min_face_size}", faces=len(faces), skip="too_small")
        # MTCNN also reports faces cut by the photo's edge, extrapolating landmarks beyond it: their crop would
        # be partly black border, so they are never chosen (and are often the "largest", at a photo's edge)
        whole = [f for f in usable if _inside(f.landmarks, image.size)]
        if not whole:
            return AlignResult(None, "skipped", "face cut off: its landmarks lie outside the image",
                               faces=len(faces), skip="cut_off")
        face = self.choose(whole, image.size)
        box, landmarks = face.box.tolist(), face.landmarks.tolist()
        try:
            crop = warp(image, estimate_transform(face.landmarks, self.size), self.size)
        except InputError as e:
            return AlignResult(None, "skipped", str(e), box, face.score, landmarks, len(faces), skip="error")
        reason = f"{len(faces)} faces, kept the {self.multi} one" if len(faces) > 1 else None
        return AlignResult(crop, "aligned", reason, box, face.score, landmarks, len(faces))

    def align_batch(self, images: Sequence[Image.Image]) -> list[AlignResult]:
        """Detect and align each image (RGB, EXIF already applied: see facesiam.data.images.load_rgb)."""
        return [self.align_faces(img, faces) for img, faces in zip(images, self.detect_batch(images))]

    def align(self, image: Image.Image) -> AlignResult:
        return self.align_batch([image])[0]


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def alignment_info(aligner: FaceAligner) -> dict[str, Any]:
    """How ``aligner`` aligns, for dataset.json and an exported model's config.json (so inference matches)."""
    return {
        "detector": {"name": "MTCNN", "package": "facenet-pytorch", "version": _package_version("facenet-pytorch"),
                     "thresholds": list(MTCNN_THRESHOLDS), "factor": MTCNN_FACTOR},
        "size": aligner.size,
        "template": {"name": "arcface", "points": [[round(float(x), 4), round(float(y), 4)]
                                                   for x, y in arcface_template(aligner.size)],
                     "landmarks": list(LANDMARK_NAMES), "coordinates": "pixel index (pixel i centred at i)"},
        "transform": "similarity (skimage.transform.SimilarityTransform, least squares)",
        "warp": "bilinear (PIL), black border, box-filter reduce first when the face is over 2x the crop",
        "min_face_size": aligner.min_face_size,
        "multi": aligner.multi,
        "on_no_face": aligner.on_no_face,
    }


# ----------------------------------------------------------------------------- a whole ImageFolder

def output_paths(relpaths: Sequence[str]) -> list[str]:
    """Each source's crop path: its relative path with the extension replaced by .png.

    When two sources would share one (a.jpg and a.png), both keep their whole name plus .png (a.jpg.png).
    """
    first = [os.path.splitext(rel)[0] + OUTPUT_EXT for rel in relpaths]
    counts: dict[str, int] = {}
    for out in first:
        counts[out] = counts.get(out, 0) + 1
    outs = [rel + OUTPUT_EXT if counts[out] > 1 else out for rel, out in zip(relpaths, first)]
    used: set[str] = set()
    for i, out in enumerate(outs):  # a source literally named a.jpg.png as well: number the rest
        n, unique = 1, out
        while unique in used:
            unique, n = f"{os.path.splitext(out)[0]}.{n}{OUTPUT_EXT}", n + 1
        used.add(unique)
        outs[i] = unique
    return outs


@dataclass
class _Job:
    """Aligns chunks of files into a folder; one per worker process (each with its own MTCNN)."""

    src: Path
    out: Path
    options: dict[str, Any]
    threads: Optional[int] = None  # torch threads in a worker process
    aligner: Optional[FaceAligner] = field(default=None, repr=False)

    def start(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # N processes x 1 thread beats 1 process x N threads for MTCNN
        self.aligner = FaceAligner(**self.options)

    def load(self, chunk: Sequence[tuple[str, str]]) -> list[Any]:
        """Each file as an RGB image, or the reason it cannot be read (never raises for one bad file)."""
        loaded: list[Any] = []
        for rel, _ in chunk:
            path = self.src / rel
            try:
                loaded.append(load_rgb(path))
            except BadImage as e:
                loaded.append(str(e).removeprefix(f"{path}: "))
            except OSError as e:  # vanished, unreadable
                loaded.append(f"cannot read: {type(e).__name__}: {e.strerror or e}")
            except Exception as e:  # anything else PIL trips over must not stop a long run either
                loaded.append(f"cannot decode: {type(e).__name__}: {e}")
        return loaded

    def align(self, chunk: Sequence[tuple[str, str]], loaded: Optional[list[Any]] = None) -> list[dict[str, Any]]:
        """Align and save one chunk; one record per file, in order."""
        loaded = self.load(chunk) if loaded is None else loaded
        images = [x for x in loaded if isinstance(x, Image.Image)]
        try:
            results = iter(self.aligner.align_batch(images))
        except Exception:  # one odd image must not cost the chunk: redo one by one, recording the failure
            results = iter([self._align_one(img) for img in images])
        records = []
        for (rel, out), item in zip(chunk, loaded):
            result = (next(results) if isinstance(item, Image.Image)
                      else AlignResult(None, "skipped", item, skip="unreadable"))
            record = {"path": rel, "output": None, **result.record()}
            if result.image is not None:
                target = self.out / out
                target.parent.mkdir(parents=True, exist_ok=True)
                # no per-file atomicity needed: the whole folder is staged
                result.image.save(target, "PNG", compress_level=PNG_COMPRESS_LEVEL)
                record["output"] = out
            records.append(record)
        return records

    def _align_one(self, image: Image.Image) -> AlignResult:
        try:
            return self.aligner.align(image)
        except Exception as e:
            return AlignResult(None, "skipped", f"cannot align: {type(e).__name__}: {e}", skip="error")


_worker_job: Optional[_Job] = None  # the job of this worker process


def _worker_start(job: _Job) -> None:
    global _worker_job
    _worker_job = job
    job.start()


def _worker_align(chunk: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    return _worker_job.align(chunk)




def _counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts = {"images": len(records), **{status: 0 for status in STATUSES}, "multi_face": 0,
              **{f"skipped_{kind}": 0 for kind in SKIP_KINDS}}
    for r in records:
        counts[r["status"]] += 1
        counts["multi_face"] += r["faces"] > 1
        if r["skip"]:
            counts[f"skipped_{r['skip']}"] += 1
    return counts


def _json_text(meta: dict[str, Any]) -> str:
    """alignment.json: the header indented, then one line per image (readable, grep-able, and compact for
    millions of images, where one field per line would be ~20x the size)."""
    head = json.dumps({k: v for k, v in meta.items() if k != "images"}, indent=1, ensure_ascii=False)
    lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in meta["images"])
    return f'{head[:-2]},\n "images": [\n{lines}\n ]\n}}\n'


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, *, size: int = TEMPLATE_SIZE,
                 workers: Optional[int] = None, device: str = "cpu", on_no_face: str = "skip",
                 multi: str = "largest", min_face_size: int = 20, batch_size: Optional[int] = None,
                 overwrite: bool = False, progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Align every image of the ImageFolder ``src`` into the ImageFolder ``dst``; return alignment.json's contents.

    Each kept face goes to its source's relative path with a .png extension (see OUTPUT_EXT). ``dst`` is built
    in a hidden folder beside it and appears complete or not at all; ``dst/alignment.json`` holds
    alignment_info, counts and one record per source image (path, output, status, reason, box, score,
    landmarks, faces). Unreadable files are skipped with their reason; a run never stops on one file.

    workers: on CPU, processes with one MTCNN and one torch thread each (default: all usable CPUs; <= 1 runs
        here); on a GPU, one batched detector here and ``workers`` threads decoding the next batch.
    progress: called after each batch with (images just done, images in all), e.g. to drive a tqdm bar.
    overwrite: replace a non-empty dst that holds a previous alignment.json (never anything else).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=ALIGNMENT_FILE, what="an aligned folder")
    options = {"size": size, "device": device, "min_face_size": min_face_size, "multi": multi,
               "on_no_face": on_no_face, "batch_size": batch_size}
    probe = FaceAligner(**options)  # checks the options and the install before any work
    info = alignment_info(probe)
    listing = list_image_folder(src)
    if not listing.classes:
        raise InputError(f"source {src} has no identity sub-folders; expected SRC/<identity>/<image>")
    rels = [rel for rel, _ in listing.samples]
    files = list(zip(rels, output_paths(rels)))
    chunks = [files[i:i + probe.batch_size] for i in range(0, len(files), probe.batch_size)]
    workers = available_cpus() if workers is None else max(1, workers)
    on_gpu = device.startswith("cuda")
    records: list[dict[str, Any]] = [{"path": printable_name(p), "output": None, "status": "skipped",
                                      "reason": "file name is not valid UTF-8; rename the file", "box": None,
                                      "score": None, "landmarks": None, "faces": 0, "skip": "unreadable"}
                                     for p in listing.bad_names]

    with staged_directory(dst, last=ALIGNMENT_FILE) as tmp:
        if on_gpu or workers <= 1 or len(chunks) <= 1:
            job = _Job(src, tmp, options, aligner=probe)
            # decode the next chunk in threads while this one is aligned (PIL releases the GIL while decoding)
            with concurrent.futures.ThreadPoolExecutor(max(1, workers if on_gpu else 1)) as pool:
                pending = pool.submit(job.load, chunks[0]) if chunks else None
                for k, chunk in enumerate(chunks):
                    loaded = pending.result()
                    pending = pool.submit(job.load, chunks[k + 1]) if k + 1 < len(chunks) else None
                    records += job.align(chunk, loaded)
                    if progress is not None:
                        progress(len(chunk), len(files))
        else:
            job = _Job(src, tmp, options, threads=1)
            with multiprocessing.get_context().Pool(min(workers, len(chunks)), _worker_start, (job,)) as pool:
                for chunk, done in zip(chunks, pool.imap(_worker_align, chunks)):  # ordered: stable json
                    records += done
                    if progress is not None:
                        progress(len(chunk), len(files))
                pool.close()
                pool.join()  # let the workers exit cleanly (leaving the block would kill them)
        kept = {r["output"].split("/", 1)[0] for r in records if r["output"]}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": str(src.resolve()),
            "alignment": info,
            "counts": _counts(records),
            "seconds": round(time.perf_counter() - start, 3),
            "classes": [printable_name(c) for c in listing.classes],
            "identities_without_images": [printable_name(c) for c in listing.classes if c not in kept],
            "ignored_files": listing.ignored_files,
            "loose_images": listing.loose_images,
            "images": records,
        }
        write_text(tmp / ALIGNMENT_FILE, _json_text(meta))
    return meta


def read_alignment(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """``folder/alignment.json`` of a folder align_folder made, or None when there is none."""
    path = Path(folder) / ALIGNMENT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); align the photos again with tools/align_faces.py") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: not an alignment record this facesiam reads (format {meta.get('format')!r} "
                         f"version {meta.get('version')!r}); align the photos again with tools/align_faces.py")
    return meta


def align_shards(src: str | os.PathLike, dst: str | os.PathLike, *, size: int = TEMPLATE_SIZE,
                 workers: Optional[int] = None, device: str = "cpu", on_no_face: str = "skip",
                 multi: str = "largest", min_face_size: int = 20, batch_size: Optional[int] = None,
                 overwrite: bool = False, align_progress: Optional[Callable[[int, int], None]] = None,
                 **shard_options: Any) -> dict[str, Any]:
    """``make_shards --align``: align the raw ImageFolder ``src`` and pack the crops into shards at ``dst``.

    The crops go to a hidden folder beside ``dst`` (deleted afterwards) and are packed by write_shards, whose
    dataset.json then records the alignment (detector, template, size) and every image's result. Returns the
    dataset.json contents. ``shard_options`` are write_shards' (val_identities, seed, resize, progress, ...);
    ``align_progress`` is align_folder's ``progress``.
    """
    from .format import METADATA_FILE
    from .writer import write_shards

    src, dst = Path(src), Path(dst)
    if shard_options.get("center_crop"):
        raise InputError("--center-crop cannot go with --align: aligned crops are already centred on the face")
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=METADATA_FILE, what="a shard folder")  # before the long part
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.resolve().name}.aligning-", dir=parent) as tmp:
        faces = Path(tmp) / "faces"
        align_folder(src, faces, size=size, workers=workers, device=device, on_no_face=on_no_face, multi=multi,
                     min_face_size=min_face_size, batch_size=batch_size, progress=align_progress)
        return write_shards(faces, dst, workers=workers, overwrite=overwrite, source=str(src.resolve()),
                            **shard_options)


# ----------------------------------------------------------------------------- inference: align like training

def recorded_alignment(data: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The alignment ``data`` (a shard folder or an ImageFolder) already went through, or None: raw images."""
    from .format import METADATA_FILE, read_metadata

    data = Path(data)
    if (data / METADATA_FILE).is_file():
        return (read_metadata(data).get("alignment") or {}).get("info")
    meta = read_alignment(data)
    return meta["alignment"] if meta else None


def aligner_for(info: dict[str, Any], device: str = "cpu", on_no_face: str = "skip") -> FaceAligner:
    """A FaceAligner that aligns as ``info`` (alignment_info, from dataset.json or a model's config.json) says."""
    detector, template = (info.get("detector") or {}).get("name"), (info.get("template") or {}).get("name")
    if detector != "MTCNN" or template != "arcface":
        raise InputError(f"alignment by detector {detector!r} onto template {template!r}: this facesiam aligns with "
                         "MTCNN onto the ArcFace template only; align the images yourself and pass --no-align")
    return FaceAligner(size=int(info.get("size", TEMPLATE_SIZE)), device=device,
                       min_face_size=int(info.get("min_face_size", 20)), multi=info.get("multi", "largest"),
                       on_no_face=on_no_face)


def describe_alignment(info: dict[str, Any]) -> str:
    """One phrase for logs: how images are aligned."""
    return f"MTCNN + 5 landmarks onto the ArcFace {info.get('size', TEMPLATE_SIZE)}x{info.get('size', TEMPLATE_SIZE)} "\
           f"template ({info.get('multi', 'largest')} face)"


def align_images(images: Sequence[Image.Image], names: Sequence[str], aligner: FaceAligner) -> list[Image.Image]:
    """The aligned face of each image; an image without a usable face is a one-line error naming it."""
    crops = []
    for name, result in zip(names, aligner.align_batch(images)):
        if result.image is None or result.status != "aligned":
            raise InputError(f"{name}: {result.reason}, but the model was trained on aligned faces; use a photo in "
                             f"which one face of at least {aligner.min_face_size} px is fully visible, or pass "
                             "--no-align if the image is already an aligned face crop")
        crops.append(result.image)
    return crops


class AlignedView(_FaceDataset):
    """A data set of raw photos seen through the face aligner: ``view[i]`` = (transform(aligned face i), label).

    For evaluating an aligned model on raw images. An image without a usable face is centre-cropped with a
    warning naming it (evaluation keeps every image, so that N and the labels stay those of the data). The
    detector is built lazily in each process (DataLoader workers), never pickled.
    """

    def __init__(self, base: Any, info: dict[str, Any], transform: Optional[Callable] = None, device: str = "cpu"):
        self.base, self.info, self.transform, self.device = base, info, transform, device
        self.labels, self.classes, self.paths = base.labels, base.classes, base.paths
        self._aligner: Optional[FaceAligner] = None
        aligner_for(info, device)  # checks the detector, the template and the install before any work

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_aligner": None}

    def _image(self, index: int) -> Image.Image:
        if self._aligner is None:
            self._aligner = aligner_for(self.info, self.device)
        image = self.base._image(index)
        result = self._aligner.align(image)
        if result.image is None:
            log.warning("%s: %s; using a centre crop", self.paths[index], result.reason)
            return center_crop(image, self._aligner.size)
        return result.image
