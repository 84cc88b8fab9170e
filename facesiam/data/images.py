"""Image policy shared by the shard writer and the readers: decode once, keep good bytes, normalise the rest.

Every image is fully decoded once while packing (so broken files are caught then, not in epoch 37). What a
shard stores:

* the original file bytes when the file is an 8-bit RGB or grayscale JPEG, PNG or WebP with no EXIF rotation:
  every WebDataset reader (``.decode("pil").to_tuple("jpg;png;webp", ...)``), PIL, OpenCV and torchvision.io
  read those correctly, and keeping them avoids a lossy re-encode;
* otherwise a converted 8-bit RGB (or grayscale) image, because a standard reader would mishandle the file:

  ========================  =============================================  ===================================
  input                     what a standard reader does                    what is stored
  ========================  =============================================  ===================================
  EXIF orientation != 1     shows the face sideways (PIL ignores EXIF)     rotated pixels, EXIF dropped
  CMYK / YCCK JPEG          torchvision.io / some decoders fail or invert  RGB
  16-bit PNG (grey or RGB)  PIL ``convert("RGB")`` clips grey to white;    8-bit (high byte), RGB or grey
                            OpenCV/torchvision.io return uint16
  alpha (RGBA, LA, tRNS)    alpha dropped, hidden pixels show              composited over white, RGB
  palette (P), 1-bit        fine in PIL, not in all readers                RGB / grey
  PGM, PPM, BMP, TIFF, GIF  not matched by ``to_tuple("jpg;png;webp")``    PNG (lossless)
  ========================  =============================================  ===================================

  Converted images from lossy sources (JPEG, WebP) are stored as JPEG quality 95, from lossless sources as PNG.
  The member extension is the stored format (``jpg``, ``png`` or ``webp``), whatever the file was called.

Written by hand (not a library) because the point is the policy itself: which files to pass through untouched.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

# -----------------------------------------------------------------------------
# Stored as-is when 8-bit RGB/L: the formats every WebDataset consumer selects with "jpg;png;webp".
PASS_THROUGH = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSY_FORMATS = {"JPEG", "MPO", "WEBP"}  # converted images from these are re-encoded as JPEG, others as PNG
JPEG_QUALITY = 95
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white (how image viewers show them)
EXIF_ORIENTATION = 0x0112
# -----------------------------------------------------------------------------


class BadImage(InputError):
    """A file that cannot be used as a training image; ``str(exc)`` is the reason (one line)."""


class TooManyPixels(BadImage):
    """An image over a pixel limit (checked from its header, before decoding)."""


@dataclass
class PackedImage:
    """An image ready for a shard: its bytes, extension (``jpg``/``png``/``webp``), size and how it was made."""

    data: bytes
    ext: str
    width: int
    height: int
    converted: Optional[str]  # None: the original file bytes; otherwise why it was re-encoded


def _png_bit_depth(raw: bytes) -> int:
    """Bit depth from the PNG header (PIL silently reduces 16-bit RGB PNGs to 8 bits)."""
    return raw[24] if len(raw) > 25 and raw[12:16] == b"IHDR" else 8


def normalize(img: Image.Image, raw: bytes | None = None) -> tuple[Image.Image, Optional[str]]:
    """Return (8-bit RGB or L image, reason it differs from the file's own pixels, or None).

    ``img`` must be loaded. ``raw`` (the file bytes) lets 16-bit PNGs be detected.
    """
    reasons = []
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block does not make the pixels unusable
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
        reasons.append("EXIF orientation")
    mode = img.mode
    if mode in ("RGB", "L"):
        if img.format == "PNG" and raw is not None and _png_bit_depth(raw) == 16:
            reasons.append("16-bit")  # PIL already kept the high byte; re-encode so other readers agree
        if "transparency" in img.info:  # tRNS chunk on an RGB/L PNG: a colour meant to be see-through
            img = _flatten_alpha(img.convert("RGBA"))
            reasons.append("alpha")
    elif mode.startswith("I") or mode == "F":
        img = _to_8bit_grey(img)
        reasons.append("16-bit" if mode.startswith("I") else "float")
    elif mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img.convert("RGBA"))
        reasons.append("alpha")
    elif mode == "P":
        img = img.convert("RGB")
        reasons.append("palette")
    elif mode == "1":
        img = img.convert("L")
        reasons.append("1-bit")
    else:  # CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
        reasons.append(mode)
    return img, (", ".join(reasons) if reasons else None)


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    a = np.asarray(img)
    if img.mode == "F":  # float images: [0, 1] if they look normalised, else [0, 255]
        scale = 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else 1.0
        a = np.nan_to_num(a * scale).clip(0, 255)
    else:  # 16-bit (or 32-bit holding 16-bit values, as PIL reads some PNG/TIFF): keep the high byte
        a = a.astype(np.int64).clip(0, 65535) >> 8
    return Image.fromarray(a.astype(np.uint8), "L")


def _decode(raw: bytes) -> Image.Image:
    if not raw:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # full decode: truncated or corrupt data raises here
    except UnidentifiedImageError:
        raise BadImage("not an image: the content matches no image format PIL knows") from None
    except Image.DecompressionBombError as e:  # a pixel limit like the caller's own: the same error (413)
        raise TooManyPixels(f"too many pixels ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ... on bad data
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
    return img


def crop_and_resize(img: Image.Image, resize: Optional[int] = None, center_crop: Optional[float] = None) -> Image.Image:
    """Optionally keep the central square ``center_crop`` x shorter side, then shrink the shorter side to ``resize``.

    Never enlarges: the point is smaller shards.
    """
    if center_crop is not None:
        side = max(1, round(center_crop * min(img.size)))
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if resize is not None and min(img.size) > resize:
        scale = resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if min(size) != resize:  # rounding: make the shorter side exactly `resize`
            size = tuple(resize if s == min(size) else s for s in size)
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def pack_image(raw: bytes, *, resize: Optional[int] = None,
               center_crop: Optional[float] = None) -> PackedImage:
    """Decode ``raw`` fully and return what a shard stores for it; raise BadImage with the reason if unusable."""
    img = _decode(raw)
    fmt = img.format
    out, reason = normalize(img, raw)
    if resize is not None or center_crop is not None:
        before = out.size
        out = crop_and_resize(out, resize, center_crop)
        if out.size != before:
            reason = f"{reason}, resized" if reason else "resized"
    if reason is None and fmt in PASS_THROUGH:
        return PackedImage(raw, PASS_THROUGH[fmt], out.width, out.height, None)
    if reason is None:
        reason = f"{fmt} format"  # e.g. PGM/PPM (PIL says PPM), BMP, TIFF, GIF
    buf = io.BytesIO()
    if fmt in LOSSY_FORMATS:
        out.save(buf, "JPEG", quality=JPEG_QUALITY)
        ext = "jpg"
    else:
        out.save(buf, "PNG")
        ext = "png"
    return PackedImage(buf.getvalue(), ext, out.width, out.height, reason)


def decode_rgb(raw: bytes, draft: Optional[int] = None) -> Image.Image:
    """Decode image bytes already normalised by :func:`pack_image` (a shard member) to a PIL RGB image.

    ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (PIL's draft: the DCT does the downscaling) as long
    as both sides stay >= draft pixels; other formats decode at full size.
    """
    img = Image.open(io.BytesIO(raw))
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", (draft, draft))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


@functools.cache  # once per process (a forked loader worker inherits it)
def opencv():
    """cv2, set to one thread per call (one image per call, many loader workers: threads would only contend)."""
    try:
        import cv2
    except ImportError:
        raise InputError("this needs OpenCV: pip install opencv-python-headless "
                         "(or --augment-implementation torchvision)") from None
    cv2.setNumThreads(1)
    return cv2


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def jpeg_size(raw: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG's frame header, None if ``raw`` is no JPEG (or the header is not found).

    By hand because only the frame size is needed: PIL's header parser reads every table in Python (~0.15 ms, as
    much as decoding a 112 px face).
    """
    if raw[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(raw)
    while i + 9 <= n:
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return int.from_bytes(raw[i + 7:i + 9], "big"), int.from_bytes(raw[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(raw[i + 2:i + 4], "big")
    return None


def decode_rgb_array(raw: bytes, draft: Optional[int] = None) -> np.ndarray:
    """:func:`decode_rgb` to an H x W x 3 uint8 RGB array, decoded by OpenCV: the same libjpeg(-turbo) pixels
    as PIL's (tests compare them) without PIL's copy out of its image buffer (~0.2 ms of a 250 px image).
    ``draft`` as there: a JPEG decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= draft."""
    cv2 = opencv()
    flag = cv2.IMREAD_COLOR
    size = jpeg_size(raw) if draft is not None else None
    if size is not None:
        scale = min(size[0] // draft, size[1] // draft)  # PIL's draft rule
        if scale >= 2:
            flag = next(f for k, f in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                       (2, cv2.IMREAD_REDUCED_COLOR_2)) if scale >= k)
    # the shards hold no EXIF rotation (pack_image applies it): decode the pixels as stored, like PIL
    out = cv2.imdecode(np.frombuffer(raw, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if out is None:
        raise BadImage("OpenCV cannot decode this image (rebuild the shards with tools/make_shards.py)")
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read any image file as a PIL RGB image under the same policy as the shards (EXIF, 16-bit, alpha, ...).

    Raises BadImage naming the file when it cannot be used.
    """
    with open(path, "rb") as f:
        return rgb_from_bytes(f.read(), str(path))


def rgb_from_bytes(raw: bytes, name: str, max_pixels: Optional[int] = None,
                   max_aspect: Optional[float] = None) -> Image.Image:
    """Image bytes (a file's, an upload's) -> PIL RGB under the shards' policy; BadImage naming ``name`` if unusable.

    ``max_pixels``: refuse larger images from their header, before decoding (a decompression bomb never expands);
    ``max_aspect``: refuse images longer than this many times their width or the other way round (a 1 x 39,000,000
    strip passes a pixel budget but costs a gigabyte to decode and holds no face).
    """
    try:
        if max_pixels is not None:
            try:
                with Image.open(io.BytesIO(raw)) as probe:
                    width, height = probe.size
            except Exception:  # not an image at all: _decode says so below
                width = height = 0
            if width * height > max_pixels:
                raise TooManyPixels(f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")
            if max_aspect is not None and min(width, height) and max(width, height) > max_aspect * min(width, height):
                raise TooManyPixels(f"{width}x{height}: more than {max_aspect:g} times longer than wide; send a photo")
        img, _ = normalize(_decode(raw), raw)
    except BadImage as e:
        raise type(e)(f"{name}: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")
