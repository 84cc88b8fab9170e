"""One face per photo, aligned: a detector's faces -> the face to keep -> a crop on the 5-point template.

``FaceAligner`` takes any registered detector (faces/detectors.py), keeps one face per image (the largest or the
most central; never one cut off by the border or below min_face_size) and warps it onto the ArcFace template
(faces/template.py). ``alignment_info`` records how, so that inference aligns exactly as training did
(``aligner_for``). Images are read with facesiam.data.images.load_rgb (EXIF rotation, CMYK, 16-bit, palette and
grey files handled as the shard writer handles them) before detection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError
from .detectors import DETECTORS, Detector, Face, build_detector
from .template import TEMPLATE_SIZE, center_crop, estimate_transform, inside, template_info, warp

MULTI_CHOICES = ("largest", "central")
NO_FACE_CHOICES = ("skip", "center")
STATUSES = ("aligned", "center", "skipped")
SKIP_KINDS = ("no_face", "too_small", "cut_off", "unreadable", "error")
DEFAULT_DETECTOR = "mtcnn"


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


class FaceAligner:
    """Detect faces and align one per image onto the ArcFace template.

    size: output crop side in pixels (the template is scaled by size/112).
    detector: a registered detector's name (faces/detectors.py: DETECTORS) or a Detector object.
    device: "cpu" or "cuda" (the detector's forward passes; the warp runs on the CPU).
    min_face_size: smallest face searched for and kept, in source pixels (the box's longer side).
    multi: which face to keep when there are several: the "largest" box, or the "central" one (box centre
        nearest the image centre).
    on_no_face: "skip" an image without a face, or crop its "center" instead (status "center"). Faces
        smaller than min_face_size, faces cut off by the image border (a landmark outside it) and images
        smaller than min_face_size are always skipped.
    batch_size: images per detector call (default: the detector's own, e.g. MTCNN 16 on CPU, 64 on GPU).
    """

    def __init__(self, size: int = TEMPLATE_SIZE, device: str = "cpu", min_face_size: int = 20,
                 multi: str = "largest", on_no_face: str = "skip", batch_size: Optional[int] = None,
                 detector: Union[str, Detector] = DEFAULT_DETECTOR):
        if size < 8:
            raise InputError(f"alignment size must be >= 8 pixels, got {size}")
        if multi not in MULTI_CHOICES:
            raise InputError(f"multi must be one of {', '.join(MULTI_CHOICES)}, got {multi!r}")
        if on_no_face not in NO_FACE_CHOICES:
            raise InputError(f"on_no_face must be one of {', '.join(NO_FACE_CHOICES)}, got {on_no_face!r}")
        self.size, self.device, self.min_face_size = size, device, min_face_size
        self.multi, self.on_no_face = multi, on_no_face
        self.detector = (build_detector(detector, device=device, min_face_size=min_face_size, batch_size=batch_size)
                         if isinstance(detector, str) else detector)
        self.batch_size = self.detector.batch_size

    # ------------------------------------------------------------------ detection

    def detect_batch(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """All faces in each image (any size; choosing one is align_faces' job)."""
        return self.detector.detect_batch(images)

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
        # Detectors (MTCNN) also report faces cut by the photo's edge, extrapolating landmarks beyond it: their crop would
        # be partly black border, so they are never chosen (and are often the "largest", at a photo's edge)
        whole = [f for f in usable if inside(f.landmarks, image.size)]
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

    def align_each(self, image: Image.Image, faces: Sequence[Face]) -> list[AlignResult]:
        """One result per detected face (a group photo): each aligned, or skipped with the reason."""
        results = []
        for face in faces:
            box, landmarks, score = face.box.tolist(), face.landmarks.tolist(), float(face.score)
            if face.size < self.min_face_size:
                results.append(AlignResult(None, "skipped", f"face too small: {face.size:.0f} px < min_face_size "
                                           f"{self.min_face_size}", box, score, landmarks, len(faces), "too_small"))
            elif not inside(face.landmarks, image.size):
                results.append(AlignResult(None, "skipped", "face cut off: its landmarks lie outside the image", box,
                                           score, landmarks, len(faces), "cut_off"))
            else:
                try:
                    crop = warp(image, estimate_transform(face.landmarks, self.size), self.size)
                    results.append(AlignResult(crop, "aligned", None, box, score, landmarks, len(faces)))
                except InputError as e:
                    results.append(AlignResult(None, "skipped", str(e), box, score, landmarks, len(faces), "error"))
        return results

    def align_batch(self, images: Sequence[Image.Image]) -> list[AlignResult]:
        """Detect and align each image (RGB, EXIF already applied: see facesiam.data.images.load_rgb)."""
        return [self.align_faces(img, faces) for img, faces in zip(images, self.detect_batch(images))]

    def align(self, image: Image.Image) -> AlignResult:
        return self.align_batch([image])[0]


def alignment_info(aligner: FaceAligner) -> dict[str, Any]:
    """How ``aligner`` aligns, for dataset.json and an exported model's config.json (so inference matches)."""
    return {
        "detector": aligner.detector.info(),
        "size": aligner.size,
        "template": template_info(aligner.size),
        "transform": "similarity (skimage.transform.SimilarityTransform, least squares)",
        "warp": "bilinear (PIL), black border, box-filter reduce first when the face is over 2x the crop",
        "min_face_size": aligner.min_face_size,
        "multi": aligner.multi,
        "on_no_face": aligner.on_no_face,
    }


PREALIGNED = {"arcface112": TEMPLATE_SIZE}  # make_shards --aligned NAME: crops someone else aligned, by template


def prealigned_info(name: str = "arcface112", size: Optional[int] = None) -> dict[str, Any]:
    """alignment_info for crops already aligned onto the ArcFace template elsewhere (insightface's RecordIO data,
    make_shards --aligned arcface112): the record --align writes with the default detector and settings, so a model
    trained on them detects and aligns raw photos the same way at inference; "prealigned" names where they came from.
    """
    if name not in PREALIGNED:
        raise InputError(f"unknown pre-alignment {name!r}; known: {', '.join(PREALIGNED)}")
    detector_class = DETECTORS.get(DEFAULT_DETECTOR).build
    probe = FaceAligner.__new__(FaceAligner)  # the settings alignment_info reads; no detector network is loaded
    probe.detector = detector_class.__new__(detector_class)
    probe.size, probe.min_face_size, probe.multi, probe.on_no_face = size or PREALIGNED[name], 20, "largest", "skip"
    probe.detector.min_face_size = probe.min_face_size
    return {**alignment_info(probe), "prealigned": name}


def aligner_for(info: dict[str, Any], device: str = "cpu", on_no_face: str = "skip") -> FaceAligner:
    """A FaceAligner that aligns as ``info`` (alignment_info, from dataset.json or a model's config.json) says."""
    detector, template = (info.get("detector") or {}).get("name"), (info.get("template") or {}).get("name")
    if str(detector).lower() not in DETECTORS.names() or template != "arcface":
        raise InputError(f"alignment by detector {detector!r} onto template {template!r}: this facesiam aligns with "
                         f"{', '.join(DETECTORS.names())} onto the ArcFace template only; align the images yourself "
                         "and pass --no-align")
    return FaceAligner(size=int(info.get("size", TEMPLATE_SIZE)), device=device, detector=str(detector).lower(),
                       min_face_size=int(info.get("min_face_size", 20)), multi=info.get("multi", "largest"),
                       on_no_face=on_no_face)


def describe_alignment(info: dict[str, Any]) -> str:
    """One phrase for logs: how images are aligned."""
    size, detector = info.get("size", TEMPLATE_SIZE), (info.get("detector") or {}).get("name", "MTCNN")
    return f"{detector} + 5 landmarks onto the ArcFace {size}x{size} template ({info.get('multi', 'largest')} face)"


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

