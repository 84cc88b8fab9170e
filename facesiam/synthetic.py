"""Procedurally drawn synthetic faces: a built-in, license-free ImageFolder for demos, tests and smoke runs.

Each identity gets stable traits (face shape, skin tone, eyes, brows, nose, mouth, hair, ears, facial hair,
glasses, moles, freckles); each image of it varies pose (roll, yaw, translation, scale), expression (smile, open
mouth, raised brows, blink, gaze), lighting (gradient, brightness, colour cast, contrast), clothing, background,
blur and sensor noise. Identity is learnable but not trivial: raw-pixel nearest neighbour is only a few times
better than chance, while a trained embedding does far better.

Everything is drawn with PIL.ImageDraw at twice the target size and box-downsampled (cheap antialiasing).
An image depends only on (seed, identity, image index), never on worker count or order, so a dataset is
reproducible bit for bit. Written by hand because no maintained library generates identity-structured faces.
This module needs only numpy, PIL, tqdm and facesiam.fileio (standard library), so importing it is cheap.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .data.folder import available_cpus
from .errors import InputError
from .fileio import staged_directory, write_json

# -----------------------------------------------------------------------------
# defaults (the README demo uses ~200 identities x 10 images at 112 px; tests use 20 x 8 at 64 px)
DEFAULT_SIZE = 112
DEFAULT_SEED = 0
GENERATOR_VERSION = 1  # bump when the drawing changes, so old datasets are known to differ
METADATA_FILE = "synthetic.json"  # top-level file (ImageFolder readers only look at sub-folders)
# -----------------------------------------------------------------------------

Color = tuple[float, float, float]

SKIN_TONES = np.array([(255, 226, 200), (241, 194, 160), (224, 172, 130), (198, 134, 90),
                       (150, 95, 60), (95, 60, 40)], np.float32)
HAIR_COLORS = np.array([(22, 18, 16), (55, 38, 28), (95, 66, 42), (125, 60, 30), (205, 170, 110),
                        (150, 148, 145), (228, 226, 220), (165, 75, 35)], np.float32)
HAIR_WEIGHTS = np.array([0.26, 0.22, 0.16, 0.07, 0.12, 0.07, 0.04, 0.06])
IRIS_COLORS = np.array([(95, 58, 32), (45, 30, 22), (70, 110, 170), (80, 120, 70), (120, 130, 140),
                        (135, 105, 55)], np.float32)
HAIR_STYLES = ("bald", "crop", "side_part", "fringe", "long", "curly", "bun", "buzz", "receding")
BEARDS = ("none", "stubble", "moustache", "goatee", "full")


@dataclass(frozen=True)
class FaceTraits:
    """What stays the same across all images of one identity. Lengths are fractions of the image side."""

    skin: Color
    face_w: float  # half-width
    face_h: float  # half-height
    squareness: float  # superellipse exponent: 2 = ellipse, larger = squarer
    jaw_taper: float  # how much the lower face narrows
    chin: float  # how much the chin protrudes
    ear_size: float
    ear_y: float
    hair_style: str
    hair_color: Color
    hairline: float  # 0 = at the brows, 1 = top of the head
    hair_volume: float
    part_side: float  # -1 .. 1, asymmetry of the hairline
    brow_y: float
    brow_len: float
    brow_thick: float
    brow_tilt: float  # +: outer ends higher
    brow_arch: float
    eye_y: float
    eye_spacing: float  # half the distance between the eye centres
    eye_w: float
    eye_h: float
    eye_tilt: float  # radians, +: outer corners higher
    iris: Color
    iris_frac: float
    nose_style: int
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lip_color: Color
    beard: str
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_color: Color
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius) relative to the face
    freckles: int  # seed of a fixed freckle pattern, 0 = none
    blush: float


@dataclass(frozen=True)
class ImageVariation:
    """What changes from one image of an identity to the next."""

    roll: float  # degrees
    yaw: float  # -1 .. 1: features shift sideways, the far ear hides
    shift: tuple[float, float]
    scale: float
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: tuple[float, float]
    glasses_on: bool
    skin_jitter: Color
    clothing: Color
    background: tuple[Color, Color]
    background_angle: float
    n_background_shapes: int
    light_angle: float
    light_strength: float
    brightness: float
    cast: Color
    contrast: float
    blur: float
    noise: float
    occluder: bool


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _mix(a, b, t: float) -> np.ndarray:
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


def sample_traits(seed: int, identity: int) -> FaceTraits:
    """The stable traits of one identity (deterministic in (seed, identity))."""
    r = _rng(seed, 0, identity)
    u = r.uniform
    t = u(0, len(SKIN_TONES) - 1)
    i = int(t)
    skin = _mix(SKIN_TONES[i], SKIN_TONES[min(i + 1, len(SKIN_TONES) - 1)], t - i) * u(0.95, 1.05, 3)
    hair = HAIR_COLORS[r.choice(len(HAIR_COLORS), p=HAIR_WEIGHTS)] * u(0.85, 1.15, 3)
    beard = BEARDS[r.choice(len(BEARDS), p=[0.6, 0.1, 0.1, 0.08, 0.12])]
    face_w = u(0.21, 0.28)
    face_h = face_w * u(1.12, 1.45)
    moles = tuple((u(-0.7, 0.7), u(-0.5, 0.8), u(0.012, 0.025)) for _ in range(r.choice(4, p=[0.45, 0.3, 0.15, 0.1])))
    return FaceTraits(
        skin=tuple(np.clip(skin, 0, 255)), face_w=face_w, face_h=face_h, squareness=u(2.0, 3.4),
        jaw_taper=u(0.0, 0.38), chin=u(0.0, 0.08), ear_size=u(0.045, 0.075), ear_y=u(-0.12, 0.08),
        hair_style=HAIR_STYLES[r.integers(len(HAIR_STYLES))], hair_color=tuple(np.clip(hair, 0, 255)),
        hairline=u(0.25, 0.7), hair_volume=u(0.02, 0.12), part_side=u(-1, 1),
        brow_y=u(-0.36, -0.24), brow_len=u(0.07, 0.12), brow_thick=u(0.01, 0.028), brow_tilt=u(-0.3, 0.3),
        brow_arch=u(0.0, 0.025), eye_y=u(-0.2, -0.06), eye_spacing=u(0.085, 0.125), eye_w=u(0.04, 0.062),
        eye_h=u(0.016, 0.03), eye_tilt=u(-0.2, 0.25), iris=tuple(IRIS_COLORS[r.integers(len(IRIS_COLORS))]),
        iris_frac=u(0.75, 1.0), nose_style=int(r.integers(3)), nose_len=u(0.09, 0.17), nose_w=u(0.03, 0.06),
        mouth_y=u(0.22, 0.34), mouth_w=u(0.06, 0.11), lip_thick=u(0.012, 0.03),
        lip_color=tuple(np.clip(skin * _mix((0.85, 0.55, 0.55), (0.7, 0.45, 0.45), u()), 0, 255)),
        beard=beard, glasses=int(r.choice(3, p=[0.72, 0.14, 0.14])),
        glasses_color=tuple(r.choice([(20, 20, 20), (90, 60, 30), (150, 150, 160), (140, 30, 30)])),
        moles=moles, freckles=int(r.integers(1, 2**31)) if u() < 0.15 else 0, blush=u(0, 0.12) if u() < 0.4 else 0.0,
    )


def sample_variation(seed: int, identity: int, index: int) -> ImageVariation:
    """The per-image nuisance factors (deterministic in (seed, identity, index))."""
    r = _rng(seed, 1, identity, index)
    u = r.uniform
    return ImageVariation(
        roll=float(np.clip(r.normal(0, 7), -18, 18)), yaw=u(-0.8, 0.8), shift=(u(-0.06, 0.06), u(-0.05, 0.05)),
        scale=u(0.86, 1.12), smile=u(-0.4, 1.0), mouth_open=u(0.1, 1.0) if u() < 0.3 else 0.0,
        brow_raise=float(np.clip(r.normal(0, 0.6), -1, 1.5)), eye_open=0.1 if u() < 0.08 else u(0.7, 1.15),
        gaze=(u(-1, 1), u(-0.5, 0.5)), glasses_on=u() > 0.15, skin_jitter=tuple(u(0.93, 1.07, 3)),
        clothing=_muted(r, 60), background=(_muted(r, 45), _muted(r, 45)),
        background_angle=u(0, 2 * math.pi), n_background_shapes=int(r.integers(0, 6)),
        light_angle=u(0, 2 * math.pi), light_strength=u(0.0, 0.55), brightness=u(0.7, 1.25),
        cast=tuple(u(0.88, 1.12, 3)), contrast=u(0.75, 1.2), blur=u(0.3, 1.2) if u() < 0.3 else 0.0,
        noise=u(0, 9), occluder=u() < 0.08,
    )


def _muted(r: np.random.Generator, tint: float) -> Color:
    """A grey level plus a limited tint: photo backgrounds and clothes are rarely saturated."""
    return tuple(np.clip(r.uniform(25, 230) + r.uniform(-tint, tint, 3), 0, 255))


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _arc(p0, p1, bulge: float, n: int = 12) -> np.ndarray:
    """Quadratic curve from p0 to p1 whose middle is pushed `bulge` along +y (image down)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    ctrl = (p0 + p1) / 2 + np.array([0.0, 2 * bulge])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p1


class _Painter:
    """Draws in face coordinates (fractions of the image side, origin at the face centre, y down);
    the pose (roll, scale, shift) is applied to every point, so shapes stay consistent under rotation."""

    def __init__(self, draw: ImageDraw.ImageDraw, canvas: int, v: ImageVariation, centre=(0.5, 0.46)):
        a = math.radians(v.roll)
        k = canvas * v.scale
        self.m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * k
        self.o = np.array([centre[0] + v.shift[0], centre[1] + v.shift[1]]) * canvas
        self.k = k
        self.draw = draw

    def pts(self, p: np.ndarray) -> list[tuple[float, float]]:
        q = np.asarray(p, float).reshape(-1, 2) @ self.m.T + self.o
        return [tuple(x) for x in q]

    def poly(self, p: np.ndarray, fill) -> None:
        self.draw.polygon(self.pts(p), fill=_rgb(fill))

    def line(self, p: np.ndarray, fill, width: float, closed: bool = False) -> None:
        q = self.pts(p)
        if closed:
            q = q + q[:1]
        self.draw.line(q, fill=_rgb(fill), width=max(1, round(width * self.k)), joint="curve")


def _rgb(c) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(x))) for x in c)


def _face_outline(t: FaceTraits, n: int = 64) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    e = 2.0 / t.squareness
    c, s = np.cos(a), np.sin(a)
    x = t.face_w * np.sign(c) * np.abs(c) ** e
    y = t.face_h * np.sign(s) * np.abs(s) ** e
    lower = np.clip(s, 0, None)
    x = x * (1 - t.jaw_taper * lower**2)
    y = y + t.chin * lower**12
    return np.stack([x, y], 1)


def _background(canvas: int, v: ImageVariation, r: np.random.Generator) -> Image.Image:
    # a linear gradient is computed coarsely and upsampled: bilinear interpolation keeps it exact and cheap
    g = np.linspace(-1, 1, 16, dtype=np.float32)
    ramp = (np.cos(v.background_angle) * g[None, :] + np.sin(v.background_angle) * g[:, None]) * 0.5 + 0.5
    c0, c1 = np.asarray(v.background[0], np.float32), np.asarray(v.background[1], np.float32)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    im = Image.fromarray(img.astype(np.uint8), "RGB").resize((canvas, canvas), Image.BILINEAR)
    d = ImageDraw.Draw(im)
    for _ in range(v.n_background_shapes):
        x0, y0 = r.uniform(-0.2, 1.0, 2) * canvas
        w, h = r.uniform(0.1, 0.6, 2) * canvas
        col = _rgb(_muted(r, 45))
        if r.uniform() < 0.5:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
    return im


@dataclass
class _Scene:
    """What every part of one face drawing needs: the painter, the traits and variation, derived colours."""

    P: _Painter
    t: FaceTraits
    v: ImageVariation
    r: np.random.Generator  # minor random details, drawn in a fixed order (background, stubble, occluder, noise)
    skin: np.ndarray
    shade: np.ndarray
    hair: np.ndarray
    fx: float  # sideways shift of the eyes/mouth with yaw; the nose tip moves further (it sticks out)
    outline: Optional[np.ndarray] = None  # the head's outline (set by _draw_head)

    @property
    def fw(self) -> float:
        return self.t.face_w

    @property
    def fh(self) -> float:
        return self.t.face_h

    @property
    def mouth_c(self) -> np.ndarray:
        return np.array([self.fx, self.t.mouth_y * self.fh])


def render_face(traits: FaceTraits, v: ImageVariation, size: int = DEFAULT_SIZE, *, detail_seed: int = 0) -> Image.Image:
    """Draw one face image (RGB, size x size). `detail_seed` seeds the minor random details
    (background shapes, stubble, occluder position)."""
    canvas = 2 * size  # draw at 2x, then box-downsample: cheap antialiasing
    r = np.random.default_rng(detail_seed)
    im = _background(canvas, v, r)
    skin = np.asarray(traits.skin) * np.asarray(v.skin_jitter)
    s = _Scene(P=_Painter(ImageDraw.Draw(im), canvas, v), t=traits, v=v, r=r, skin=skin, shade=skin * 0.78,
               hair=np.asarray(traits.hair_color), fx=0.045 * v.yaw)
    # back to front: what is drawn later covers what was drawn before
    for part in (_draw_back_hair, _draw_neck, _draw_ears, _draw_head, _draw_skin_marks, _draw_facial_hair,
                 _draw_eyes, _draw_brows, _draw_nose, _draw_mouth, _draw_top_hair, _draw_glasses, _draw_occluder):
        part(s)
    return _photometric(im.reduce(2), v, r, size)


def _draw_back_hair(s: _Scene) -> None:
    """Hair behind the head."""
    P, t, fw, fh, hair = s.P, s.t, s.fw, s.fh, s.hair
    style = t.hair_style
    top = -fh * (1.04 + t.hair_volume)
    if style == "long":
        back = np.array([[-fw * 1.22, top * 0.6], [fw * 1.22, top * 0.6], [fw * 1.32, fh * 1.35], [-fw * 1.32, fh * 1.35]])
        P.poly(np.vstack([_ellipse(0, 0, fw * 1.2, -top * 1.02)[16:], back[2:]]), hair)
    elif style == "curly":
        for ang in np.linspace(0, 2 * math.pi, 14, endpoint=False):
            if math.sin(ang) > 0.45:
                continue
            P.poly(_ellipse(fw * 1.1 * math.cos(ang), fh * 0.95 * math.sin(ang) - 0.02, fw * 0.45, fw * 0.45, n=20), hair)
    elif style == "bun":
        P.poly(_ellipse(0, top - fw * 0.25, fw * 0.42, fw * 0.36, n=24), hair)


def _draw_neck(s: _Scene) -> None:
    """Neck and shoulders."""
    P, fw, fh, shade = s.P, s.fw, s.fh, s.shade
    neck_w = fw * 0.55
    P.poly(np.array([[-neck_w, fh * 0.3], [neck_w, fh * 0.3], [neck_w * 1.05, fh * 1.5], [-neck_w * 1.05, fh * 1.5]]), shade)
    P.poly(_ellipse(0, fh * 1.55 + 0.18, fw * 2.4, 0.24, n=40), s.v.clothing)
    P.poly(_ellipse(0, fh * 1.2, neck_w * 1.05, fh * 0.18, n=20), shade)  # neckline


def _draw_ears(s: _Scene) -> None:
    """Ears (the far one hides as the head turns)."""
    P, t, fw, fh, yaw = s.P, s.t, s.fw, s.fh, s.v.yaw
    for side in (-1, 1):
        vis = 1 - max(0.0, -side * yaw) * 0.9
        if vis < 0.25:
            continue
        ex = side * (fw * (1 - 0.08 * t.jaw_taper) + t.ear_size * 0.35 * vis - 0.01 * side * yaw)
        P.poly(_ellipse(ex, t.ear_y * fh, t.ear_size * 0.55 * vis, t.ear_size, n=20), s.skin)
        P.poly(_ellipse(ex, t.ear_y * fh, t.ear_size * 0.28 * vis, t.ear_size * 0.6, n=16), s.shade)


def _draw_head(s: _Scene) -> None:
    outline = _face_outline(s.t)
    outline[:, 0] += 0.3 * s.fx * (1 - np.abs(outline[:, 0]) / s.fw)
    s.P.poly(outline, s.skin)
    s.outline = outline


def _draw_skin_marks(s: _Scene) -> None:
    """Freckles, blush, moles."""
    P, t, fw, fh, fx, skin = s.P, s.t, s.fw, s.fh, s.fx, s.skin
    if t.blush:
        for side in (-1, 1):
            P.poly(_ellipse(side * t.eye_spacing * 1.15 + fx, t.mouth_y * fh * 0.45, 0.035, 0.022, n=16),
                   _mix(skin, (230, 90, 90), t.blush * 2))
    if t.freckles:
        fr = np.random.default_rng(t.freckles)
        for x, y in zip(fr.uniform(-0.55, 0.55, 30), fr.uniform(-0.1, 0.25, 30)):
            P.poly(_ellipse(x * fw + fx, y * fh, 0.004, 0.004, n=6), skin * 0.7)
    for mx, my, mr in t.moles:
        P.poly(_ellipse(mx * fw * 0.9 + fx, my * fh, mr * 0.5, mr * 0.5, n=10), skin * 0.4)


def _draw_facial_hair(s: _Scene) -> None:
    """Beards and moustaches, drawn before the mouth, which sits on top of them."""
    P, t, fw, fh, fx, skin, outline = s.P, s.t, s.fw, s.fh, s.fx, s.skin, s.outline
    mouth_c = s.mouth_c
    beard_col = s.hair * 0.85
    if t.beard == "full":
        low = outline[outline[:, 1] > fh * 0.12]
        low = low[np.argsort(-np.arctan2(low[:, 1], low[:, 0]))]
        P.poly(np.vstack([low, [[fw * 0.55, fh * 0.18], [-fw * 0.55, fh * 0.18]]][::-1]), beard_col)
        P.poly(_ellipse(mouth_c[0], mouth_c[1], t.mouth_w * 1.15, t.lip_thick * 2.2 + 0.012, n=20), skin)
    if t.beard in ("full", "moustache"):
        P.poly(np.vstack([_arc((mouth_c[0] - t.mouth_w * 1.1, mouth_c[1] - 0.004), (mouth_c[0] + t.mouth_w * 1.1, mouth_c[1] - 0.004), -0.03),
                          _arc((mouth_c[0] + t.mouth_w * 0.9, mouth_c[1] - 0.025), (mouth_c[0] - t.mouth_w * 0.9, mouth_c[1] - 0.025), -0.008)]), beard_col)
    if t.beard == "goatee":
        P.poly(_ellipse(mouth_c[0], mouth_c[1] + 0.045, t.mouth_w * 0.55, 0.03, n=20), beard_col)
    if t.beard == "stubble":
        for x, y in zip(s.r.uniform(-0.85, 0.85, 160), s.r.uniform(0.1, 1.0, 160)):
            if abs(x) < 1 - 0.6 * y**2:
                P.poly(_ellipse(x * fw + fx, y * fh, 0.003, 0.003, n=4), _mix(skin, beard_col, 0.6))


def _draw_eyes(s: _Scene) -> None:
    P, t, v, fh, fx, skin, yaw = s.P, s.t, s.v, s.fh, s.fx, s.skin, s.v.yaw
    for side in (-1, 1):
        c = np.array([side * t.eye_spacing + fx, t.eye_y * fh])
        ew, eh = t.eye_w * (1 - 0.15 * side * yaw), t.eye_h * v.eye_open
        tilt = -side * t.eye_tilt
        if v.eye_open < 0.3:
            P.line(_arc(c - (ew, 0), c + (ew, 0), 0.006), skin * 0.45, 0.004)
            continue
        P.poly(_ellipse(c[0], c[1], ew, eh, tilt, n=24), (240, 238, 232))
        ir = min(t.eye_h * t.iris_frac, ew * 0.6)
        ic = c + np.array([v.gaze[0] * (ew - ir) * 0.8, v.gaze[1] * eh * 0.3])
        P.poly(_ellipse(ic[0], ic[1], ir, ir, n=20), t.iris)
        P.poly(_ellipse(ic[0], ic[1], ir * 0.45, ir * 0.45, n=12), (10, 10, 10))
        P.poly(_ellipse(ic[0] + ir * 0.3, ic[1] - ir * 0.3, ir * 0.15, ir * 0.15, n=8), (250, 250, 250))
        # eyelids in skin colour clip the iris to the eye opening
        rim = _ellipse(c[0], c[1], ew, eh, tilt, n=24)
        upper, lower = rim[12:], rim[:13]
        m = ir + 0.01
        P.poly(np.vstack([upper, [[c[0] + ew + m, c[1] - eh - m], [c[0] - ew - m, c[1] - eh - m]]]), skin)
        P.poly(np.vstack([lower, [[c[0] - ew - m, c[1] + eh + m], [c[0] + ew + m, c[1] + eh + m]]]), skin)
        P.line(np.vstack([upper, rim[:1]]), skin * 0.4, 0.004)


def _draw_brows(s: _Scene) -> None:
    t, v = s.t, s.v
    for side in (-1, 1):
        inner = np.array([side * t.eye_spacing * 0.35 + s.fx, t.brow_y * s.fh - 0.012 * v.brow_raise])
        outer = inner + np.array([side * t.brow_len, -t.brow_tilt * t.brow_len - 0.006 * v.brow_raise])
        s.P.line(_arc(inner, outer, -t.brow_arch, n=8), s.hair * 0.8, t.brow_thick)


def _draw_nose(s: _Scene) -> None:
    P, t, fh, fx, shade = s.P, s.t, s.fh, s.fx, s.shade
    tip = np.array([fx * 2.0, t.eye_y * fh + t.nose_len + 0.02])
    if t.nose_style == 0:
        P.line(np.array([[fx * 0.8 + 0.01, t.eye_y * fh], tip + (0.008, -0.01)]), shade, 0.006)
    elif t.nose_style == 1:
        P.poly(np.array([[fx + 0.004, t.eye_y * fh + 0.01], tip + (t.nose_w * 0.6, 0), tip + (-t.nose_w * 0.2, 0.004)]), shade * 1.1)
    P.line(_arc(tip - (t.nose_w, 0.005), tip + (t.nose_w, -0.005), 0.01), shade * 0.85, 0.006)
    for side in (-1, 1):
        P.poly(_ellipse(tip[0] + side * t.nose_w * 0.5, tip[1] - 0.002, t.nose_w * 0.22, t.nose_w * 0.13, n=10), s.skin * 0.45)


def _draw_mouth(s: _Scene) -> None:
    """The corners rise with the smile; an open mouth shows a dark inside and teeth."""
    P, t, v, mouth_c = s.P, s.t, s.v, s.mouth_c
    w = t.mouth_w * (1 + 0.15 * max(v.smile, 0))
    left, right = mouth_c + (-w, -0.02 * v.smile), mouth_c + (w, -0.02 * v.smile)
    gap = 0.035 * v.mouth_open
    seam_top = _arc(left, right, 0.012 * v.smile)
    seam_bot = _arc(left, right, 0.012 * v.smile + gap)
    if gap > 0.003:
        P.poly(np.vstack([seam_top, seam_bot[::-1]]), (60, 20, 25))
        P.poly(np.vstack([seam_top, seam_top[::-1] + (0, gap * 0.35)]), (235, 230, 220))
    upper_lip = _arc(left, right, -t.lip_thick * 0.8 + 0.012 * v.smile)
    P.poly(np.vstack([upper_lip, seam_top[::-1]]), t.lip_color)
    lower_lip = _arc(left, right, 0.012 * v.smile + gap + t.lip_thick * 1.3)
    P.poly(np.vstack([seam_bot, lower_lip[::-1]]), _mix(t.lip_color, (255, 255, 255), 0.08))
    P.line(seam_top, np.asarray(t.lip_color) * 0.55, 0.004)


def _draw_top_hair(s: _Scene) -> None:
    """Hair on top: a cap between an outer arc and the hairline (or, bald on top, a fringe on the sides)."""
    P, t, fw, fh, hair = s.P, s.t, s.fw, s.fh, s.hair
    style = t.hair_style
    if style == "bald":
        if t.hairline > 0.45:
            for side in (-1, 1):
                P.poly(np.array([[side * fw * 0.92, -fh * 0.35], [side * fw * 1.06, -fh * 0.4],
                                 [side * fw * 1.06, fh * 0.05], [side * fw * 0.94, fh * 0.05]]), hair)
        return
    vol = 0.01 if style in ("buzz", "receding") else t.hair_volume
    hl = 0.1 + 0.6 * t.hairline if style != "receding" else 0.75 + 0.1 * t.hairline
    if style == "fringe":
        hl = 0.2 + 0.2 * t.hairline
    a = np.linspace(math.pi - 0.15, 2 * math.pi + 0.15, 40)
    outer = np.stack([fw * (1.03 + vol) * np.cos(a), fh * (1.03 + vol) * np.sin(a)], 1)
    xs = np.linspace(1, -1, 24)
    side_y = fh * 0.12 if style != "receding" else -fh * 0.3
    hairline_y = -fh * hl - t.part_side * 0.08 * fh * xs * (style == "side_part")
    p = 6.0 if style == "fringe" else 2.0
    inner = np.stack([xs * fw * 0.98, side_y + (hairline_y - side_y) * (1 - np.abs(xs) ** p)], 1)
    if style == "receding":  # M-shaped hairline
        inner[:, 1] -= 0.12 * fh * np.sin(np.abs(xs) * math.pi) * (np.abs(xs) < 1)
    col = _mix(hair, s.skin, 0.45) if style == "buzz" else hair
    P.poly(np.vstack([outer, inner]), col)
    if style == "long":
        for side in (-1, 1):
            P.poly(np.array([[side * fw * 0.8, -fh * 0.5], [side * fw * 1.25, -fh * 0.3],
                             [side * fw * 1.3, fh * 1.1], [side * fw * 0.98, fh * 1.0], [side * fw * 0.92, fh * 0.2]]), hair)


def _draw_glasses(s: _Scene) -> None:
    P, t, fh, fx = s.P, s.t, s.fh, s.fx
    if not (t.glasses and s.v.glasses_on):
        return
    gw = t.eye_w * 1.5
    for side in (-1, 1):
        c = np.array([side * t.eye_spacing + fx, t.eye_y * fh])
        if t.glasses == 1:
            rim = _ellipse(c[0], c[1], gw, gw * 0.85, n=28)
        else:
            rim = np.array([[c[0] - gw, c[1] - gw * 0.65], [c[0] + gw, c[1] - gw * 0.65],
                            [c[0] + gw, c[1] + gw * 0.6], [c[0] - gw, c[1] + gw * 0.6]])
        P.line(rim, t.glasses_color, 0.008, closed=True)
        P.line(np.array([[c[0] + side * gw, c[1] - 0.01], [side * s.fw * 1.0, t.ear_y * fh - 0.01]]), t.glasses_color, 0.007)
    P.line(_arc((fx - t.eye_spacing + gw, t.eye_y * fh - 0.01), (fx + t.eye_spacing - gw, t.eye_y * fh - 0.01), -0.006),
           t.glasses_color, 0.007)


def _draw_occluder(s: _Scene) -> None:
    """An occasional occluder (a hand, a microphone, a scarf...)."""
    if s.v.occluder:
        r = s.r
        ox, oy = r.uniform(-0.25, 0.25), r.uniform(0.0, 0.35)
        s.P.poly(_ellipse(ox, oy, r.uniform(0.06, 0.14), r.uniform(0.05, 0.12), r.uniform(0, math.pi)), r.uniform(0, 255, 3))


def _photometric(im: Image.Image, v: ImageVariation, r: np.random.Generator, size: int) -> Image.Image:
    """Lighting gradient, brightness, colour cast, contrast, blur, noise (on the downsampled image)."""
    x = np.asarray(im, np.float32)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = np.cos(v.light_angle) * g[None, :] + np.sin(v.light_angle) * g[:, None]
    x = x * (v.brightness * (1 + v.light_strength * ramp))[..., None] * np.asarray(v.cast, np.float32)
    mean = x.mean()
    x = (x - mean) * v.contrast + mean
    if v.blur:
        x = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(v.blur * size / 112)), np.float32)
    x = x + r.normal(0, v.noise, x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB")


def synthetic_face(identity: int, index: int, *, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> Image.Image:
    """Image `index` of identity `identity` (deterministic in (seed, identity, index))."""
    return render_face(sample_traits(seed, identity), sample_variation(seed, identity, index), size,
                       detail_seed=int(_rng(seed, 2, identity, index).integers(2**63)))


def identity_name(identity: int, identities: int) -> str:
    return f"id_{identity:0{max(5, len(str(identities - 1)))}d}"


def _image_name(index: int, images_per_identity: int) -> str:
    return f"{index:0{max(4, len(str(images_per_identity - 1)))}d}.png"


def _write_identity(job: tuple[Path, int, int, int, int, int]) -> int:
    """Worker: render and write all images of one identity; returns how many were written."""
    root, identity, identities, images_per_identity, size, seed = job
    folder = root / identity_name(identity, identities)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images_per_identity):
        path = folder / _image_name(k, images_per_identity)
        tmp = path.with_name(f".{path.name}.tmp")
        # compress_level 1: noisy images barely compress further, and level 6 costs ~1 ms more per image
        synthetic_face(identity, k, size=size, seed=seed).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)  # a file is either complete or absent
    return images_per_identity



def make_synthetic_faces(out: str | os.PathLike, identities: int, images_per_identity: int, *,
                         size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, workers: int | None = None,
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Write an ImageFolder of synthetic faces: out/id_00000/0000.png ... and out/synthetic.json.

    The dataset is built in a hidden sibling folder and renamed into place when complete, so `out` never holds
    a partial dataset and (with overwrite=True) a good old dataset is only replaced by a complete new one.
    """
    out = Path(out)
    if identities < 1 or images_per_identity < 1:
        raise InputError(f"need identities >= 1 and images_per_identity >= 1, got {identities} and {images_per_identity}")
    if size < 16:
        raise InputError(f"size must be >= 16 pixels, got {size}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass --overwrite to replace it")
    workers = min(available_cpus() if workers is None else max(1, workers), identities)

    with staged_directory(out, last=METADATA_FILE) as staging:
        jobs = [(staging, i, identities, images_per_identity, size, seed) for i in range(identities)]
        bar = tqdm(total=identities * images_per_identity, unit="img", desc="synthetic faces", disable=not progress)
        if workers == 1:
            for job in jobs:
                bar.update(_write_identity(job))
        else:
            chunk = max(1, min(16, identities // (workers * 8)))
            with multiprocessing.get_context().Pool(workers) as pool:
                for n in pool.imap_unordered(_write_identity, jobs, chunksize=chunk):
                    bar.update(n)
        bar.close()
        meta = {"generator": "facesiam.synthetic", "version": GENERATOR_VERSION, "identities": identities,
                "images_per_identity": images_per_identity, "size": size, "seed": seed}
        write_json(staging / METADATA_FILE, meta)
    return out
