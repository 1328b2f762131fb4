"""A synthetic pedestrian re-ID dataset in the Market-1501 layout (numpy + PIL only).

The embedded default for `make demo` and the tests. Each identity has a fixed appearance (skin, hair,
garment colours and textures, sleeve and trouser kinds, build, backpack/bag/hat/print); each view adds
the nuisances real detector crops have: facing direction, walking pose, vertical shift and scale, a
missing lower body, occluders, background clutter (including other people), camera-specific scenes
and colour casts, blur, noise and brightness. Garment colours come from a small palette that many
identities share, and cameras shift colours strongly, so a randomly initialised network matches poorly
while a trained one can learn the combination of cues that identify a person.

Layout written: `OUT/bounding_box_train/`, `OUT/query/`, `OUT/bounding_box_test/` with names
`PPPP_cCsS_FFFFFF_DD.jpg`; the gallery also holds distractors (pid 0) and junk (pid -1), and every
query has a match from another camera in the gallery. Everything derives from `seed`: the same
arguments give byte-identical files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import MARKET_FOLDERS

# Garment palette (sRGB 0..1), weighted towards the dark and neutral colours most people wear.
PALETTE = np.array([
    (0.08, 0.08, 0.09), (0.92, 0.92, 0.90), (0.50, 0.50, 0.52), (0.28, 0.28, 0.30), (0.12, 0.16, 0.35),
    (0.20, 0.38, 0.72), (0.55, 0.70, 0.88), (0.75, 0.12, 0.12), (0.42, 0.08, 0.10), (0.15, 0.45, 0.22),
    (0.40, 0.42, 0.20), (0.78, 0.70, 0.52), (0.42, 0.28, 0.16), (0.90, 0.78, 0.20), (0.90, 0.55, 0.65),
    (0.42, 0.22, 0.55),
], dtype=np.float32)
PALETTE_WEIGHTS = np.array([10, 5, 5, 7, 6, 4, 3, 3, 2, 2, 2, 3, 3, 1, 1, 1], dtype=np.float64)
PALETTE_WEIGHTS /= PALETTE_WEIGHTS.sum()
SKIN = np.array([(0.96, 0.80, 0.69), (0.87, 0.68, 0.55), (0.70, 0.50, 0.36), (0.45, 0.30, 0.20),
                 (0.30, 0.20, 0.14)], dtype=np.float32)
HAIR = np.array([(0.05, 0.04, 0.03), (0.20, 0.12, 0.06), (0.45, 0.30, 0.15), (0.75, 0.62, 0.35),
                 (0.55, 0.55, 0.55)], dtype=np.float32)
FRONT, BACK, LEFT, RIGHT = 0, 1, 2, 3


@dataclass
class Person:
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: np.ndarray
    upper2: np.ndarray
    pattern: int          # 0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks, 4 yoke, 5 open jacket
    period: float         # stripe period (fraction of the person's height)
    long_sleeves: bool
    lower: np.ndarray
    lower_kind: int       # 0 trousers, 1 shorts, 2 skirt
    shoes: np.ndarray
    width: float          # build
    waist: float          # waist height (fraction of the person's height)
    backpack: np.ndarray | None
    bag: np.ndarray | None
    bag_side: int
    hat: np.ndarray | None
    logo: np.ndarray | None


@dataclass
class Camera:
    mix: np.ndarray       # 3x3 colour mixing (cast)
    offset: np.ndarray
    gamma: float
    wall: np.ndarray
    floor: np.ndarray
    horizon: float
    bands: list           # (x0, x1, colour) vertical structures of the scene, fractions of the width
    blur: bool
    noise: float


def _colour(rng: np.random.Generator, jitter: float = 0.05) -> np.ndarray:
    base = PALETTE[rng.choice(len(PALETTE), p=PALETTE_WEIGHTS)]
    return np.clip(base + rng.normal(0, jitter, 3), 0, 1).astype(np.float32)


def random_person(rng: np.random.Generator) -> Person:
    upper = _colour(rng)
    return Person(
        skin=np.clip(SKIN[rng.integers(len(SKIN))] + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32),
        hair=HAIR[rng.integers(len(HAIR))], long_hair=bool(rng.random() < 0.35),
        upper=upper, upper2=_colour(rng), pattern=int(rng.choice(6, p=[0.4, 0.15, 0.1, 0.1, 0.1, 0.15])),
        period=float(rng.uniform(0.03, 0.07)), long_sleeves=bool(rng.random() < 0.6),
        lower=_colour(rng), lower_kind=int(rng.choice(3, p=[0.7, 0.15, 0.15])), shoes=_colour(rng),
        width=float(rng.uniform(0.85, 1.2)), waist=float(rng.uniform(0.47, 0.56)),
        backpack=_colour(rng) if rng.random() < 0.3 else None,
        bag=_colour(rng) if rng.random() < 0.25 else None, bag_side=int(rng.choice([-1, 1])),
        hat=_colour(rng) if rng.random() < 0.15 else None,
        logo=_colour(rng) if rng.random() < 0.3 else None,
    )


def random_camera(rng: np.random.Generator) -> Camera:
    mix = np.eye(3, dtype=np.float32) + rng.normal(0, 0.08, (3, 3)).astype(np.float32)
    mix *= rng.uniform(0.75, 1.25, 3).astype(np.float32)[:, None]
    bands = [(x, x + rng.uniform(0.05, 0.3), _colour(rng, 0.1)) for x in rng.uniform(-0.1, 1.0, rng.integers(1, 4))]
    return Camera(mix=mix, offset=rng.normal(0, 0.04, 3).astype(np.float32), gamma=float(rng.uniform(0.8, 1.25)),
                  wall=_colour(rng, 0.1), floor=_colour(rng, 0.1), horizon=float(rng.uniform(0.45, 0.8)),
                  bands=bands, blur=bool(rng.random() < 0.4), noise=float(rng.uniform(0.01, 0.04)))


class _Canvas:
    """A float RGB image with soft-edged shape painting; shapes are evaluated on their bounding box only."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), np.float32)
        self.ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self.xs = np.arange(width, dtype=np.float32)[None, :] + 0.5

    def _region(self, x0: float, y0: float, x1: float, y1: float):
        r0, r1 = max(0, int(y0) - 1), min(self.h, int(np.ceil(y1)) + 1)
        c0, c1 = max(0, int(x0) - 1), min(self.w, int(np.ceil(x1)) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1), self.xs[:, c0:c1], self.ys[r0:r1]

    def _blend(self, sy, sx, alpha, colour) -> None:
        a = alpha[..., None]
        target = self.img[sy, sx]
        target += a * (np.asarray(colour, np.float32) - target)

    def box(self, x0, y0, x1, y1, colour, texture=None) -> None:
        reg = self._region(x0, y0, x1, y1)
        if reg is None:
            return
        sy, sx, X, Y = reg
        alpha = np.clip(np.minimum(np.minimum(X - x0, x1 - X), np.minimum(Y - y0, y1 - Y)) + 0.5, 0, 1)
        self._blend(sy, sx, alpha, texture(X, Y) if texture else colour)

    def ellipse(self, cx, cy, rx, ry, colour, texture=None) -> None:
        reg = self._region(cx - rx, cy - ry, cx + rx, cy + ry)
        if reg is None:
            return
        sy, sx, X, Y = reg
        d = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
        alpha = np.clip((1 - d) * min(rx, ry) + 0.5, 0, 1)
        self._blend(sy, sx, alpha, texture(X, Y) if texture else colour)

    def capsule(self, x0, y0, x1, y1, r, colour, texture=None) -> None:
        reg = self._region(min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
        if reg is None:
            return
        sy, sx, X, Y = reg
        dx, dy = x1 - x0, y1 - y0
        px, py = X - x0, Y - y0
        t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
        alpha = np.clip(r - np.hypot(px - t * dx, py - t * dy) + 0.5, 0, 1)
        self._blend(sy, sx, alpha, texture(X, Y) if texture else colour)

    def trapezoid(self, cx, y0, y1, w0, w1, colour, texture=None) -> None:
        """Vertical trapezoid centred on cx: half-width w0 at y0, w1 at y1."""
        reg = self._region(cx - max(w0, w1), y0, cx + max(w0, w1), y1)
        if reg is None:
            return
        sy, sx, X, Y = reg
        hw = w0 + (w1 - w0) * np.clip((Y - y0) / max(y1 - y0, 1e-3), 0, 1)
        alpha = np.clip(np.minimum(hw - np.abs(X - cx), np.minimum(Y - y0, y1 - Y)) + 0.5, 0, 1)
        self._blend(sy, sx, alpha, texture(X, Y) if texture else colour)


def _garment(person: Person, cx: float, top: float, ph: float, shade_hw: float):
    """Texture function of the upper garment in the person's own coordinates (it moves with them)."""
    c1, c2 = person.upper, person.upper2

    def texture(X, Y):
        u, v = (X - cx) / ph, (Y - top) / ph
        if person.pattern == 1:
            m = np.sin(2 * np.pi * v / person.period) > 0
        elif person.pattern == 2:
            m = np.sin(2 * np.pi * u / person.period) > 0
        elif person.pattern == 3:
            m = (np.sin(2 * np.pi * u / person.period) > 0) ^ (np.sin(2 * np.pi * v / person.period) > 0)
        elif person.pattern == 4:
            m = np.broadcast_to(v < person.waist * 0.55, np.broadcast_shapes(u.shape, v.shape))
        elif person.pattern == 5:
            m = np.broadcast_to(np.abs(u) < 0.03, np.broadcast_shapes(u.shape, v.shape))
        else:
            m = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
        colour = np.where(m[..., None], c2, c1)
        shade = 1.0 - 0.35 * np.clip(((X - cx) / shade_hw) ** 2, 0, 1)
        return colour * shade[..., None]
    return texture


def _draw_person(cv: _Canvas, person: Person, cx: float, top: float, ph: float, view: int,
                 swing: float, stride: float) -> None:
    """Draw `person` with height `ph` pixels, top of the head at `top`, centred on `cx`."""
    side = view in (LEFT, RIGHT)
    facing = -1 if view == LEFT else 1
    narrow = 0.62 if side else 1.0
    sw = 0.12 * person.width * ph * narrow                   # shoulder half-width
    hw = 0.105 * person.width * ph * narrow                  # hip half-width
    waist = top + person.waist * ph
    feet = top + 0.97 * ph
    sleeve = person.upper if person.long_sleeves else person.skin

    def legs():
        offsets = (-0.045, 0.045) if not side else (-0.01, 0.01)
        for i, off in enumerate(offsets):
            x_hip = cx + off * ph * person.width
            x_foot = x_hip + (stride if i == 0 else -stride) * ph
            knee_y = waist + 0.45 * (feet - waist)
            colour = person.lower if person.lower_kind == 0 else person.skin
            cv.capsule(x_hip, waist, x_foot, feet - 0.02 * ph, 0.048 * ph * person.width, colour)
            if person.lower_kind == 1:   # shorts down to the knee
                cv.capsule(x_hip, waist, x_hip + (x_foot - x_hip) * 0.45, knee_y, 0.052 * ph * person.width,
                           person.lower)
            cv.ellipse(x_foot + facing * (0.02 * ph if side else 0), feet - 0.01 * ph, 0.04 * ph, 0.022 * ph,
                       person.shoes)
        if person.lower_kind == 2:
            cv.trapezoid(cx, waist - 0.02 * ph, waist + 0.25 * ph, hw, hw * 1.6, person.lower)

    def arms(front_layer: bool):
        for i, sgn in enumerate((-1, 1)):
            if side and (i == 0) == front_layer:
                continue
            x0, y0 = cx + sgn * sw * (0.3 if side else 0.92), top + 0.2 * ph
            x1 = x0 + (sgn * 0.03 * ph if not side else 0) + (swing if i == 0 else -swing) * ph
            y1 = top + 0.52 * ph
            cv.capsule(x0, y0, x1, y1, 0.034 * ph, sleeve)
            if not person.long_sleeves:
                cv.capsule(x0, y0, x0 + (x1 - x0) * 0.35, y0 + (y1 - y0) * 0.35, 0.038 * ph, person.upper)
            cv.ellipse(x1, y1 + 0.01 * ph, 0.025 * ph, 0.028 * ph, person.skin)

    if side:
        arms(front_layer=False)
    legs()
    if person.backpack is not None and view != FRONT:
        if view == BACK:
            cv.box(cx - sw * 0.8, top + 0.19 * ph, cx + sw * 0.8, waist - 0.02 * ph, person.backpack)
        else:
            bx = cx - facing * (sw + 0.03 * ph)
            cv.box(bx - 0.05 * ph, top + 0.2 * ph, bx + 0.05 * ph, waist - 0.04 * ph, person.backpack)
    cv.trapezoid(cx, top + 0.16 * ph, waist + 0.02 * ph, sw, hw, person.upper,
                 texture=_garment(person, cx, top, ph, sw * 1.1))
    if person.logo is not None and view == FRONT:
        cv.box(cx - 0.04 * ph, top + 0.25 * ph, cx + 0.04 * ph, top + 0.32 * ph, person.logo)
    if person.backpack is not None and view == FRONT:
        for sgn in (-1, 1):
            cv.box(cx + sgn * sw * 0.55 - 0.012 * ph, top + 0.16 * ph, cx + sgn * sw * 0.55 + 0.012 * ph,
                   top + 0.35 * ph, person.backpack)
    arms(front_layer=True)
    if person.bag is not None:
        bx = cx + person.bag_side * (sw + 0.03 * ph) * (0.5 if side else 1.0)
        cv.capsule(cx - person.bag_side * sw * 0.5, top + 0.17 * ph, bx, waist, 0.008 * ph, person.bag)
        cv.box(bx - 0.045 * ph, waist - 0.04 * ph, bx + 0.045 * ph, waist + 0.08 * ph, person.bag)
    head_x = cx + (facing * 0.015 * ph if side else 0)
    cv.capsule(cx, top + 0.1 * ph, cx, top + 0.17 * ph, 0.025 * ph, person.skin)
    hair_back = view == BACK
    if person.long_hair:
        cv.trapezoid(head_x, top + 0.04 * ph, top + 0.24 * ph, 0.06 * ph, 0.075 * ph, person.hair)
    cv.ellipse(head_x, top + 0.075 * ph, 0.052 * ph, 0.068 * ph, person.hair if hair_back else person.skin)
    if not hair_back:
        cv.ellipse(head_x - (facing * 0.015 * ph if side else 0), top + 0.045 * ph, 0.054 * ph, 0.04 * ph,
                   person.hair)
    if person.hat is not None:
        cv.ellipse(head_x, top + 0.03 * ph, 0.058 * ph, 0.035 * ph, person.hat)
        if side:
            cv.box(head_x, top + 0.045 * ph, head_x + facing * 0.09 * ph, top + 0.06 * ph, person.hat)


def _background(cv: _Canvas, cam: Camera, rng: np.random.Generator) -> None:
    h, w = cv.h, cv.w
    horizon = (cam.horizon + rng.normal(0, 0.05)) * h
    floor_mix = np.clip((cv.ys - horizon) / (0.1 * h) + 0.5, 0, 1)[..., None]
    cv.img[:] = cam.wall * (1 - floor_mix) + cam.floor * floor_mix
    shift = rng.normal(0, 0.08)
    for x0, x1, colour in cam.bands:
        cv.box((x0 + shift) * w, 0, (x1 + shift) * w, horizon + 0.05 * h, colour)
    for _ in range(rng.integers(1, 6)):   # clutter: signs, bins, windows
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        cv.box(x, y, x + rng.uniform(2, 0.5 * w), y + rng.uniform(2, 0.3 * h), _colour(rng, 0.15))
    if rng.random() < 0.4:                  # another pedestrian behind, partly in view
        cv.capsule(rng.uniform(-0.1, 1.1) * w, rng.uniform(0.1, 0.4) * h, rng.uniform(-0.1, 1.1) * w,
                   rng.uniform(0.6, 1.0) * h, rng.uniform(0.08, 0.2) * w, _colour(rng))
    cv.img *= np.float32(rng.uniform(0.7, 1.0))


def _occlude(cv: _Canvas, rng: np.random.Generator) -> None:
    h, w = cv.h, cv.w
    kind = rng.integers(3)
    colour = _colour(rng, 0.1)
    if kind == 0:     # something in front of the legs: a car, a bench, a bicycle
        cv.box(-1, rng.uniform(0.55, 0.8) * h, w + 1, h + 1, colour)
    elif kind == 1:   # a pole or another person at one side
        x = rng.choice([rng.uniform(-0.1, 0.25), rng.uniform(0.75, 1.1)]) * w
        cv.capsule(x, -5, x + rng.normal(0, 3), h + 5, rng.uniform(0.1, 0.25) * w, colour)
    else:             # a passer-by's shoulder or a sign
        cv.ellipse(rng.uniform(0, 1) * w, rng.uniform(0.3, 1) * h, rng.uniform(0.2, 0.4) * w,
                   rng.uniform(0.15, 0.3) * h, colour)


def _camera_response(img: np.ndarray, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    out = img @ cam.mix.T + cam.offset
    out *= np.float32(rng.uniform(0.75, 1.3))
    levels = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    out = _gamma_table(cam.gamma)[levels]                   # the camera's response curve, as a lookup
    if cam.blur:
        out[1:-1, 1:-1] = (out[:-2, 1:-1] + out[2:, 1:-1] + out[1:-1, :-2] + out[1:-1, 2:] + 2 * out[1:-1, 1:-1]) / 6
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(cam.noise * 255)
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def _gamma_table(gamma: float) -> np.ndarray:
    return ((np.arange(256, dtype=np.float32) / 255) ** np.float32(gamma) * 255).astype(np.float32)


# The misalignment knob: detector crops from aligned (0) to badly misaligned (1). Each nuisance is
# interpolated through these (misalign 0, 0.5, 1) anchors; 0.5 is the generator's historical default, so
# the embedded demo set is unchanged. At 1 the crops are mostly misaligned vertically, the case the
# aligned local branch is for: persons 64-100 % of the crop height, their top from 6 % above to 22 %
# below the crop's top edge (feet cut off), a quarter of the crops showing the upper body only, 30 %
# occluded, and horizontal jitter of 6 % of the width.
MISALIGN_ANCHORS = (0.0, 0.5, 1.0)
MISALIGN_TABLE = {
    "scale_lo": (0.92, 0.78, 0.64),      # person height / crop height: uniform(scale_lo, scale_hi)
    "scale_hi": (0.92, 1.00, 1.00),
    "top_lo": (0.04, -0.03, -0.06),      # top of the head / crop height: uniform(top_lo, top_hi)
    "top_hi": (0.04, 0.10, 0.22),
    "truncated": (0.0, 0.12, 0.25),      # probability that the crop shows the upper body only
    "occluded": (0.0, 0.25, 0.30),       # probability of an occluder in front of the person
    "jitter": (0.0, 0.05, 0.06),         # horizontal position: normal(0.5, jitter) of the width
}
DEFAULT_MISALIGN = 0.5


def misalignment(level: float) -> dict[str, float]:
    """The nuisance parameters at misalignment `level` in [0, 1] (see MISALIGN_TABLE)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"misalign is {level}; must be in [0, 1] (0 aligned crops, 1 the hardest)")
    return {k: float(np.interp(level, MISALIGN_ANCHORS, v)) for k, v in MISALIGN_TABLE.items()}


def render_view(person: Person | None, cam: Camera, size: tuple[int, int], rng: np.random.Generator,
                misalign: float | dict[str, float] = DEFAULT_MISALIGN) -> np.ndarray:
    """One detector crop (uint8 [H, W, 3]) of `person` (None: background only, a junk crop).

    `misalign` is a level in [0, 1] or the parameters `misalignment(level)` returns."""
    return render_placed(person, cam, size, rng, misalign)[0]


def render_placed(person: Person | None, cam: Camera, size: tuple[int, int], rng: np.random.Generator,
                  misalign: float | dict[str, float] = DEFAULT_MISALIGN) -> tuple[np.ndarray, float, float]:
    """`render_view`'s crop with where the person stands in it: (image, top, height) in pixels, the
    top of the head and the person's height (NaN for a junk crop). The same draws as `render_view`:
    alignment measurements (pipeline/evaluation/alignment_check.py) know each stripe's body part."""
    m = misalignment(misalign) if not isinstance(misalign, dict) else misalign
    h, w = size
    cv = _Canvas(h, w)
    _background(cv, cam, rng)
    top = ph = float("nan")
    if person is not None:
        ph = h * rng.uniform(m["scale_lo"], m["scale_hi"])
        top = h * rng.uniform(m["top_lo"], m["top_hi"])
        if rng.random() < m["truncated"]:   # lower body missing: the crop covers the upper half only
            ph *= rng.uniform(1.5, 1.9)
            top = h * rng.uniform(-0.02, 0.05)
        view = int(rng.choice(4, p=[0.35, 0.35, 0.15, 0.15]))
        _draw_person(cv, person, w * (0.5 + rng.normal(0, 1) * m["jitter"]), top, ph, view,
                     swing=rng.normal(0, 0.04), stride=rng.normal(0, 0.05))
        if rng.random() < m["occluded"]:
            _occlude(cv, rng)
    return _camera_response(cv.img, cam, rng), float(top), float(ph)


def _save(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=90)


def make_synthetic(out: str | Path, *, train_ids: int = 150, test_ids: int = 150, seed: int = 0,
                   image_size: tuple[int, int] = (128, 64), cameras: int = 6, images_per_id: int = 18,
                   queries_per_id: int = 2, distractors: float = 0.03, junk: float = 0.01,
                   misalign: float = DEFAULT_MISALIGN, progress: bool = True) -> dict[str, int]:
    """Write the dataset under `out` and return image counts per folder.

    Identities appear in 2..`cameras` cameras with about `images_per_id` images in all; each test
    identity gives up to `queries_per_id` queries (one per camera). `distractors` and `junk` are the
    numbers of pid-0 and pid -1 gallery images as fractions of the gallery. `misalign` in [0, 1] sets how
    badly the crops are aligned (see MISALIGN_TABLE); the identities and their appearance, the cameras
    and the image counts are the same at every level (poses and backgrounds of single views differ)."""
    if train_ids < 1 or test_ids < 1:
        raise ValueError(f"train_ids={train_ids}, test_ids={test_ids}: both must be >= 1")
    if train_ids + test_ids > 9999:
        raise ValueError("at most 9999 identities fit the 4-digit Market-1501 names")
    if cameras < 2:
        raise ValueError(f"cameras is {cameras}; at least 2 are needed (queries match across cameras)")
    params = misalignment(misalign)
    h, w = int(image_size[0]), int(image_size[1])
    if h < 16 or w < 8:
        raise ValueError(f"image_size {image_size} is too small; at least 16x8")
    out = Path(out)
    folders = {split: out / name for split, name in MARKET_FOLDERS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    cam_seed, id_seed, extra_seed = root.spawn(3)
    cams = [random_camera(np.random.default_rng(s)) for s in cam_seed.spawn(cameras)]
    frames = [0] * cameras
    counts = {"train": 0, "query": 0, "gallery": 0}

    def write(split: str, pid: int, cam: int, image: np.ndarray, rng: np.random.Generator) -> None:
        frames[cam] += 1
        name = f"{pid:04d}" if pid >= 0 else "-1"
        sequence, suffix = rng.integers(1, 7), rng.integers(0, 10)
        _save(folders[split] / f"{name}_c{cam + 1}s{sequence}_{frames[cam]:06d}_{suffix:02d}.jpg", image)
        counts[split] += 1

    total = train_ids + test_ids
    id_seeds = id_seed.spawn(total)
    with tqdm(total=total, desc=f"synthesising {out}", unit="id", disable=not progress) as bar:
        for i in range(total):
            rng = np.random.default_rng(id_seeds[i])
            pid, is_test = i + 1, i >= train_ids
            person = random_person(rng)
            n_cams = int(rng.integers(2, cameras + 1))
            cam_ids = sorted(rng.choice(cameras, n_cams, replace=False).tolist())
            per_cam = 1 + rng.poisson(max(images_per_id / n_cams - 1, 0), n_cams)
            query_cams = set(rng.choice(cam_ids, min(queries_per_id, n_cams - 1), replace=False).tolist()) \
                if is_test else set()
            for cam, n in zip(cam_ids, per_cam):
                for j in range(int(n)):
                    split = "train" if not is_test else ("query" if cam in query_cams and j == 0 else "gallery")
                    write(split, pid, cam, render_view(person, cams[cam], (h, w), rng, params), rng)
            bar.update(1)
    rng = np.random.default_rng(extra_seed)
    for _ in range(int(round(distractors * counts["gallery"]))):
        cam = int(rng.integers(cameras))
        write("gallery", 0, cam, render_view(random_person(rng), cams[cam], (h, w), rng, params), rng)
    for _ in range(max(1, int(round(junk * counts["gallery"])))):
        cam = int(rng.integers(cameras))
        write("gallery", -1, cam, render_view(None, cams[cam], (h, w), rng, params), rng)
    return counts
