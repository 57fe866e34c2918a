"""Synthetic two-domain person re-identification data (the data of lf2's tests, demo and benchmark).

``write_domain("a" | "b", out, ...)`` draws procedural pedestrians and writes them in the Market-1501
layout (``bounding_box_train/``, ``query/``, ``bounding_box_test/``; names ``PPPP_cCsS_FFFFFF_NN.jpg``).

What makes it a re-ID benchmark rather than a colour-matching toy (see docs/synthetic.md):

- **Identity** = a combination of attributes living in different body parts: hair (colour, style), upper
  garment (colour, pattern, sleeves), lower garment (colour, trousers/shorts/skirt), shoes, bag (none /
  backpack / shoulder bag, colour, side), skin tone and build. Palettes are small and skewed (dark and
  neutral colours are common), so identities collide on most attributes and retrieval is not trivial;
  each identity also carries a small personal tint of its palette colours.
- **Per-shot variation**: viewpoint (front / back / side; a logo is only seen from the front, a backpack
  mostly from the back), walking pose, scale, horizontal shift, crop jitter, partial occluders (bars,
  low walls, other pedestrians), illumination.
- **Cameras**: each camera has its own viewpoint preference, person scale, gain, slight colour cast,
  blur, noise and background, all of moderate size (the size seen between cameras of one real dataset).
- **Domains**: ``a`` (6 cameras; winter-like: dark, mostly plain clothes, long sleeves and trousers,
  overcast cool light, sharp, smaller persons, paved/brick backgrounds) and ``b`` (5 cameras;
  summer-like: lighter and brighter colours, printed/striped/checked tops, short sleeves, shorts and
  skirts, warm directional sunlight with lower contrast, low resolution, tight crops, green/sand outdoor
  backgrounds, stronger JPEG compression). The shift is mostly at domain level (attribute distribution,
  imaging, background style) and shared by the domain's cameras.

Rendering is vectorised numpy on small per-primitive windows: every shape is a signed distance field
whose pixel coverage ``clip(0.5 - d, 0, 1)`` is its anti-aliased alpha, so no supersampling is needed.
PIL is used only to encode JPEG (fixed quality per domain). Every image is drawn from its own random
generator seeded by ``(seed, domain, role, identity, camera, shot)``, so the output is byte-identical for
a seed whatever the order or process drawing it.

Change anything that alters the output -> bump ``GENERATOR_VERSION`` (recorded with every result).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from ..errors import DataError
from ..storage import output_dir

GENERATOR_VERSION = "1.1"

DOMAINS = ("a", "b")
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MIN_HEIGHT, MIN_WIDTH = 32, 16

# ------------------------------------------------------------------------------------ attribute tables
# Garment colours (sRGB in [0, 1]). Several are deliberately close (black/charcoal/navy, grey/silver,
# white/cream, beige/khaki) so identities collide unless the network looks at all body parts.
COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.09, 0.09, 0.10),
    "charcoal": (0.22, 0.22, 0.24),
    "navy": (0.12, 0.15, 0.32),
    "grey": (0.50, 0.50, 0.52),
    "silver": (0.68, 0.68, 0.70),
    "white": (0.90, 0.90, 0.88),
    "cream": (0.90, 0.86, 0.74),
    "beige": (0.76, 0.67, 0.52),
    "khaki": (0.60, 0.56, 0.38),
    "brown": (0.40, 0.27, 0.17),
    "denim": (0.27, 0.38, 0.58),
    "skyblue": (0.50, 0.70, 0.88),
    "red": (0.72, 0.12, 0.13),
    "maroon": (0.42, 0.10, 0.14),
    "pink": (0.92, 0.60, 0.70),
    "orange": (0.90, 0.50, 0.15),
    "yellow": (0.92, 0.82, 0.25),
    "olive": (0.36, 0.40, 0.20),
    "green": (0.20, 0.55, 0.30),
    "purple": (0.45, 0.25, 0.55),
}
COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)

SKIN = np.array([[0.96, 0.80, 0.68], [0.85, 0.65, 0.50], [0.66, 0.46, 0.32], [0.42, 0.28, 0.20]], np.float32)
HAIR = np.array([[0.06, 0.05, 0.05], [0.22, 0.14, 0.08], [0.42, 0.28, 0.14], [0.80, 0.66, 0.38],
                 [0.62, 0.62, 0.62]], np.float32)
HAIR_STYLES = ("short", "long", "hat")
UPPER_PATTERNS = ("plain", "stripes", "checks", "logo", "jacket")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")
VIEWS = ("front", "back", "left", "right")


def _weights(spec: dict[str, float]) -> np.ndarray:
    """Probability vector over COLOUR_NAMES from a sparse {name: weight} dict (unlisted -> 0)."""
    w = np.array([spec.get(n, 0.0) for n in COLOUR_NAMES], dtype=np.float64)
    return w / w.sum()


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one domain look like itself (shared by its cameras)."""

    name: str
    num_cams: int
    upper_colours: np.ndarray  # [len(COLOURS)] probabilities
    lower_colours: np.ndarray
    shoe_colours: np.ndarray
    bag_colours: np.ndarray
    skin_p: tuple[float, ...]
    hair_p: tuple[float, ...]
    hair_style_p: tuple[float, ...]
    upper_pattern_p: tuple[float, ...]
    lower_type_p: tuple[float, ...]
    long_sleeve_p: float
    bag_p: tuple[float, ...]
    light_gain: float  # global exposure
    light_cast: tuple[float, float, float]  # white balance (multiplies R, G, B)
    contrast: float  # around mid grey
    saturation: float
    lowres: float  # effective resolution divisor: edges/textures rendered band-limited (1 = sharp)
    blur: float  # extra optical blur: edge softness in pixels at 128 px height
    noise: float  # base sensor noise (std in [0, 1] units)
    background: str  # "campus" | "street"
    person_scale: tuple[float, float]  # person height / image height range
    jpeg_quality: int
    occluder_p: float
    sun: float  # directional sunlight: brightness slope across a person's body (0 = overcast)


STYLES: dict[str, DomainStyle] = {
    # a: winter-like campus. Dark, neutral clothing; long sleeves and trousers; cool, crisp light.
    "a": DomainStyle(
        name="a",
        num_cams=6,
        upper_colours=_weights({"black": 3, "charcoal": 2, "navy": 2.5, "grey": 2, "silver": 1, "white": 1.5,
                                "beige": 1, "brown": 2, "denim": 1.5, "red": 2, "maroon": 1.5, "olive": 1.5,
                                "green": 1.5, "purple": 0.5, "khaki": 1}),
        lower_colours=_weights({"black": 4, "charcoal": 2, "navy": 2, "denim": 3, "grey": 2, "khaki": 1.5,
                                "brown": 1.5, "beige": 1, "olive": 1, "maroon": 0.5, "green": 0.5}),
        shoe_colours=_weights({"black": 5, "brown": 2, "white": 2, "grey": 1.5, "navy": 1}),
        bag_colours=_weights({"black": 4, "charcoal": 2, "navy": 2, "grey": 1.5, "brown": 1.5, "red": 1,
                              "olive": 1}),
        skin_p=(0.45, 0.30, 0.15, 0.10),
        hair_p=(0.40, 0.30, 0.15, 0.10, 0.05),
        hair_style_p=(0.45, 0.30, 0.25),
        upper_pattern_p=(0.80, 0.05, 0.03, 0.07, 0.05),
        lower_type_p=(0.85, 0.05, 0.10),
        long_sleeve_p=0.85,
        bag_p=(0.45, 0.35, 0.20),
        light_gain=0.95,
        light_cast=(0.97, 1.0, 1.05),
        contrast=1.05,
        saturation=0.95,
        lowres=1.0,
        blur=0.2,
        noise=0.015,
        background="campus",
        person_scale=(0.74, 0.90),
        jpeg_quality=92,
        occluder_p=0.06,
        sun=0.0,
    ),
    # b: summer-like street. Lighter, more colourful clothing; short sleeves, shorts, skirts; warm sun,
    # lower contrast, low resolution (upsampled) and stronger compression.
    "b": DomainStyle(
        name="b",
        num_cams=5,
        upper_colours=_weights({"white": 3, "cream": 1.5, "silver": 1.5, "grey": 1.5, "black": 1.5, "skyblue": 2,
                                "pink": 2, "yellow": 1.5, "orange": 1.5, "green": 1.5, "red": 1.5, "navy": 1,
                                "purple": 1.5, "beige": 1, "denim": 1}),
        lower_colours=_weights({"denim": 3, "black": 2, "khaki": 2, "beige": 1.5, "white": 1.5, "grey": 1.5,
                                "navy": 1.5, "skyblue": 1, "red": 0.5, "pink": 0.5}),
        shoe_colours=_weights({"white": 5, "black": 2, "grey": 2, "beige": 1, "skyblue": 0.5, "red": 0.5}),
        bag_colours=_weights({"black": 2, "beige": 2, "brown": 2, "pink": 1, "skyblue": 1, "white": 1,
                              "grey": 1, "red": 1}),
        skin_p=(0.35, 0.35, 0.20, 0.10),
        hair_p=(0.45, 0.30, 0.15, 0.07, 0.03),
        hair_style_p=(0.45, 0.40, 0.15),
        upper_pattern_p=(0.30, 0.25, 0.15, 0.25, 0.05),
        lower_type_p=(0.50, 0.30, 0.20),
        long_sleeve_p=0.15,
        bag_p=(0.45, 0.30, 0.25),
        light_gain=1.05,
        light_cast=(1.14, 1.0, 0.80),
        contrast=0.72,
        saturation=1.20,
        lowres=2.2,
        blur=0.2,
        noise=0.02,
        background="street",
        person_scale=(0.88, 1.00),
        jpeg_quality=75,
        occluder_p=0.06,
        sun=0.35,
    ),
}


# Calibration knobs (frozen with GENERATOR_VERSION; see bench/synth_calibrate.py and docs/synthetic.md).
@dataclass(frozen=True)
class Knobs:
    id_tint: float = 0.13  # std of an identity's personal offset of each garment colour (RGB units)
    shot_gain: tuple[float, float] = (0.90, 1.10)  # per-tracklet illumination range
    shot_tint: float = 0.02  # per-tracklet colour cast std
    cam_gain: float = 0.06  # per-camera gain spread (std, relative)
    cam_cast: float = 0.03  # per-camera colour cast spread (std per channel)
    cam_blur: float = 0.4  # per-camera extra edge softness (pixels at 128 px height, uniform up to this)
    cam_noise: float = 0.01  # per-camera extra noise (uniform up to this)
    cam_bg: float = 0.04  # per-camera background colour spread within the domain's style
    shift: float = 0.06  # horizontal shift of the person (fraction of width, uniform +-)
    crop: float = 0.04  # vertical crop jitter (fraction of person height)
    other_person_p: float = 0.35  # fraction of occluders that are another pedestrian


KNOBS = Knobs()


# ------------------------------------------------------------------------------------- identities
@dataclass
class Identity:
    """Appearance attributes of one person (RGB colours in [0, 1], float32 [3])."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str
    upper: np.ndarray
    upper2: np.ndarray  # pattern / inner-shirt colour
    upper_pattern: str
    long_sleeves: bool
    lower: np.ndarray
    lower_type: str
    shoes: np.ndarray
    bag: str
    bag_colour: np.ndarray
    bag_side: int  # -1 = person's right (image left in front view), +1 = left
    hat: np.ndarray
    width: float  # build: multiplies body widths
    height: float  # build: multiplies person height
    attrs: dict[str, Any] = field(default_factory=dict)  # names, for the docs and tests


def _colour(rng: np.random.Generator, probs: np.ndarray, tint: float) -> tuple[np.ndarray, str]:
    i = int(rng.choice(len(COLOUR_NAMES), p=probs))
    c = _COLOUR_RGB[i] + rng.normal(0.0, tint, 3).astype(np.float32)
    return np.clip(c, 0.02, 0.98).astype(np.float32), COLOUR_NAMES[i]


def make_identity(style: DomainStyle, rng: np.random.Generator, knobs: Knobs = KNOBS) -> Identity:
    """Draw the attributes of one person of a domain."""
    t = knobs.id_tint
    upper, un = _colour(rng, style.upper_colours, t)
    upper2, u2n = _colour(rng, _weights({"white": 3, "black": 3, "grey": 1, "red": 1, "navy": 1,
                                         "yellow": 1, "skyblue": 1}), t)
    if u2n == un:  # a pattern must be visible
        upper2 = np.clip(1.0 - upper2, 0.05, 0.95).astype(np.float32)
    lower, ln = _colour(rng, style.lower_colours, t)
    shoes, sn = _colour(rng, style.shoe_colours, t)
    bag_colour, bn = _colour(rng, style.bag_colours, t)
    hat, hn = _colour(rng, style.bag_colours, t)
    hair_i = int(rng.choice(len(HAIR), p=style.hair_p))
    skin_i = int(rng.choice(len(SKIN), p=style.skin_p))
    ident = Identity(
        skin=np.clip(SKIN[skin_i] + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32),
        hair=np.clip(HAIR[hair_i] + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32),
        hair_style=HAIR_STYLES[int(rng.choice(3, p=style.hair_style_p))],
        upper=upper,
        upper2=upper2,
        upper_pattern=UPPER_PATTERNS[int(rng.choice(len(UPPER_PATTERNS), p=style.upper_pattern_p))],
        long_sleeves=bool(rng.random() < style.long_sleeve_p),
        lower=lower,
        lower_type=LOWER_TYPES[int(rng.choice(3, p=style.lower_type_p))],
        shoes=shoes,
        bag=BAGS[int(rng.choice(3, p=style.bag_p))],
        bag_colour=bag_colour,
        bag_side=int(rng.choice([-1, 1])),
        hat=hat,
        width=float(rng.uniform(0.9, 1.12)),
        height=float(rng.uniform(0.94, 1.04)),
    )
    ident.attrs = {"upper": un, "upper2": u2n, "lower": ln, "shoes": sn, "bag_colour": bn, "hat": hn,
                   "hair": hair_i, "skin": skin_i}
    return ident


# ------------------------------------------------------------------------------------------ cameras
@dataclass(frozen=True)
class Camera:
    """Per-camera rendering parameters (moderate variation around the domain style)."""

    index: int
    view_p: tuple[float, float, float, float]  # front, back, left, right
    scale: float  # multiplies person height
    gain: float
    cast: np.ndarray  # [3]
    soft: float  # edge softness in pixels at the render size (band limit of the drawing)
    noise: float
    background: np.ndarray  # [H + 2*pad, W + 2*pad, 3] float32, cropped with jitter per shot
    pad: int


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field [h, w] in about [-1, 1]: bilinear upsampling of a coarse grid."""
    gy, gx = cells
    grid = rng.uniform(-1, 1, (gy + 1, gx + 1)).astype(np.float32)
    ys = np.linspace(0, gy, h, dtype=np.float32)
    xs = np.linspace(0, gx, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), gy - 1)
    x0 = np.minimum(xs.astype(int), gx - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx).astype(np.float32)


def _soften(img: np.ndarray, soft: float) -> np.ndarray:
    """Blur ``img`` [h, w, 3] to about the edge softness ``soft`` (pixels): repeated [1, 2, 1] / 4 passes."""
    out = img
    for _ in range(int(round(max(soft - 1.0, 0.0) ** 2 * 2))):  # variance of one pass = 0.5 px^2
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        v = p[:-2] * 0.25 + p[1:-1] * 0.5 + p[2:] * 0.25
        out = v[:, :-2] * 0.25 + v[:, 1:-1] * 0.5 + v[:, 2:] * 0.25
    return out.astype(np.float32)


def _background(style: DomainStyle, rng: np.random.Generator, h: int, w: int, knobs: Knobs) -> np.ndarray:
    """One camera's background [h, w, 3]: the domain's scene style with camera-specific colours/layout."""
    ys = np.arange(h, dtype=np.float32)[:, None] / h
    xs = np.arange(w, dtype=np.float32)[None, :] / w
    jit = lambda c: np.clip(np.array(c, np.float32) + rng.normal(0, knobs.cam_bg, 3), 0, 1).astype(np.float32)
    horizon = float(rng.uniform(0.45, 0.62))
    img = np.empty((h, w, 3), np.float32)
    if style.background == "campus":
        wall = jit(rng.choice([[0.55, 0.50, 0.47], [0.45, 0.47, 0.52], [0.58, 0.42, 0.36]]))
        floor = jit([0.42, 0.42, 0.44])
        # wall: brick / panel texture, floor: paving with perspective lines
        period_y = float(rng.uniform(0.03, 0.06))
        bricks = (np.sin(2 * np.pi * ys / period_y) > 0.85).astype(np.float32)
        panels = (np.sin(2 * np.pi * (xs * rng.uniform(2, 5) + rng.random())) > 0.9).astype(np.float32)
        tex = 0.10 * np.maximum(bricks, panels)
        wall_img = wall[None, None, :] * (1 - tex[..., None])
        lines = np.abs(np.sin(2 * np.pi * ((xs - 0.5) / (ys + 0.2) * rng.uniform(1.5, 3))))
        floor_img = floor[None, None, :] * (0.92 + 0.08 * lines[..., None])
        mask = (ys > horizon)[..., None]
        img[:] = np.where(mask, floor_img, np.broadcast_to(wall_img, img.shape))
        # a window / door block
        if rng.random() < 0.7:
            x0, x1 = sorted(rng.uniform(0, 1, 2))
            y0 = rng.uniform(0.05, 0.2)
            win = (xs > x0) & (xs < x0 + 0.3 * (x1 - x0) + 0.15) & (ys > y0) & (ys < horizon - 0.05)
            img[win] = img[win] * 0.6 + jit([0.30, 0.36, 0.42]) * 0.4
    else:  # street: sand pavement, green hedge band, sky-ish light wall
        ground = jit(rng.choice([[0.70, 0.64, 0.50], [0.62, 0.60, 0.56], [0.66, 0.58, 0.50]]))
        hedge = jit([0.25, 0.42, 0.22])
        top = jit(rng.choice([[0.80, 0.80, 0.76], [0.72, 0.74, 0.70]]))
        leaves = _lowfreq(rng, h, w, (12, 6))
        band = float(rng.uniform(0.12, 0.25))
        img[:] = top
        hedge_m = (ys > horizon - band) & (ys <= horizon)
        hedge_img = hedge[None, None, :] * (1 + 0.25 * leaves[..., None])
        img[:] = np.where(hedge_m[..., None], hedge_img, img)
        diag = (np.sin(2 * np.pi * (xs + ys) * rng.uniform(4, 7)) > 0.8).astype(np.float32)
        ground_img = ground[None, None, :] * (1 - 0.07 * diag[..., None])
        img[:] = np.where((ys > horizon)[..., None], ground_img, img)
    img *= 1 + 0.06 * _lowfreq(rng, h, w, (4, 2))[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def make_camera(style: DomainStyle, index: int, height: int, width: int, knobs: Knobs = KNOBS) -> Camera:
    """Camera ``index`` (0-based) of a domain; depends only on the domain, not on the data seed."""
    rng = np.random.default_rng([7919, DOMAINS.index(style.name), index])
    view = rng.dirichlet([5, 5, 1.5, 1.5]) * 0.7 + np.array([0.35, 0.35, 0.15, 0.15]) * 0.3
    pad = max(2, int(round(0.08 * width)))
    soft = (style.lowres + style.blur + float(rng.uniform(0, knobs.cam_blur))) * height / 128.0
    soft = max(soft, 1.0)
    return Camera(
        index=index,
        view_p=tuple(float(v) for v in view / view.sum()),
        scale=float(rng.uniform(0.94, 1.03)),
        gain=float(np.exp(rng.normal(0, knobs.cam_gain))),
        cast=np.exp(rng.normal(0, knobs.cam_cast, 3)).astype(np.float32),
        soft=soft,
        noise=float(style.noise + rng.uniform(0, knobs.cam_noise)),
        background=_soften(_background(style, rng, height + 2 * pad, width + 2 * pad, knobs), soft),
        pad=pad,
    )


# ------------------------------------------------------------------------------------------ drawing
class Canvas:
    """A float32 RGB image [H, W, 3] with anti-aliased SDF primitives drawn in place.

    Each primitive evaluates its distance field only on its bounding window, so the cost is a dozen
    numpy calls on a few hundred pixels. Coordinates are in pixels (x right, y down, pixel centres at
    integer + 0.5).
    """

    def __init__(self, img: np.ndarray, soft: float = 1.0) -> None:
        self.img = img
        self.soft = float(soft)
        self._shade: Optional[np.ndarray] = None  # [1, W, 1] colour factor of directional light, or None
        self.h, self.w = img.shape[:2]
        self._ys = np.arange(self.h, dtype=np.float32) + 0.5
        self._xs = np.arange(self.w, dtype=np.float32) + 0.5

    def _window(self, x0: float, y0: float, x1: float, y1: float) -> Optional[tuple[int, int, int, int]]:
        a, b = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, self.h)
        c, d = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, self.w)
        if a >= b or c >= d:
            return None
        return a, b, c, d

    def paint(self, win: tuple[int, int, int, int], alpha: np.ndarray, colour: np.ndarray) -> None:
        """Blend ``colour`` ([3] or [h, w, 3]) into the window with coverage ``alpha`` [h, w]."""
        a, b, c, d = win
        sub = self.img[a:b, c:d]
        if self._shade is not None:
            colour = colour * self._shade[:, c:d]
        sub += alpha[..., None] * (colour - sub)

    def set_light(self, slope: float, cx: float, half_width: float) -> None:
        """Directional light: colours painted from now on are scaled by
        ``1 + slope * clip((x - cx) / half_width, -1, 1)`` (one side of a body brighter than the other)."""
        t = np.clip((self._xs - cx) / half_width, -1.0, 1.0)
        self._shade = (1.0 + slope * t).astype(np.float32)[None, :, None]

    # --- primitives: each returns (window, coverage) or None when off-canvas
    def capsule(self, ax: float, ay: float, bx: float, by: float, r: float):
        win = self._window(min(ax, bx) - r - 1, min(ay, by) - r - 1, max(ax, bx) + r + 1, max(ay, by) + r + 1)
        if win is None:
            return None
        a, b, c, d = win
        py = self._ys[a:b, None] - ay
        px = self._xs[None, c:d] - ax
        dx, dy = bx - ax, by - ay
        ll = dx * dx + dy * dy
        if ll > 1e-6:
            t = px * (dx / ll) + py * (dy / ll)
            np.maximum(t, 0.0, out=t)
            np.minimum(t, 1.0, out=t)
            ex, ey = px - t * dx, py - t * dy
        else:
            ex, ey = px, py
        dist = np.sqrt(ex * ex + ey * ey) - r
        return win, _cov(dist, self.soft)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float):
        win = self._window(cx - rx - 1, cy - ry - 1, cx + rx + 1, cy + ry + 1)
        if win is None:
            return None
        a, b, c, d = win
        nx = (self._xs[None, c:d] - cx) / rx
        ny = (self._ys[a:b, None] - cy) / ry
        dist = (np.sqrt(nx * nx + ny * ny) - 1.0) * min(rx, ry)
        return win, _cov(dist, self.soft)

    def trapezoid(self, cx: float, y0: float, y1: float, hw0: float, hw1: float):
        """Vertical trapezoid: half-width ``hw0`` at top ``y0`` to ``hw1`` at bottom ``y1``."""
        hw = max(hw0, hw1)
        win = self._window(cx - hw - 1, y0 - 1, cx + hw + 1, y1 + 1)
        if win is None:
            return None
        a, b, c, d = win
        ys = self._ys[a:b, None]
        t = np.clip((ys - y0) / max(y1 - y0, 1e-3), 0, 1)
        half = hw0 + (hw1 - hw0) * t
        dx = np.abs(self._xs[None, c:d] - cx) - half
        dy = np.abs(ys - (y0 + y1) / 2) - (y1 - y0) / 2
        dist = np.maximum(dx, dy)
        return win, _cov(dist, self.soft)

    def rect(self, x0: float, y0: float, x1: float, y1: float):
        return self.trapezoid((x0 + x1) / 2, y0, y1, (x1 - x0) / 2, (x1 - x0) / 2)

    def coords(self, win: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d = win
        return self._xs[None, c:d], self._ys[a:b, None]


def _cov(dist: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Coverage of a pixel whose centre is at signed distance ``dist`` (pixels) from an edge: a linear
    ramp ``soft`` pixels wide (1 = plain anti-aliasing; wider = optical blur / low resolution)."""
    c = dist * np.float32(-1.0 / soft) if soft != 1.0 else np.negative(dist)
    c += 0.5
    np.maximum(c, 0.0, out=c)
    np.minimum(c, 1.0, out=c)
    return c


def _soft_wave(v: np.ndarray, period: float, soft: float = 1.0) -> np.ndarray:
    """Band-limited square wave in [0, 1] of ``v`` (pixels) with the given period (pixels).

    Edges are ``soft`` pixels wide; the contrast fades to 0 as the period approaches 2 * soft (what a
    camera of that resolution would still resolve)."""
    s = np.sin(v * (2 * np.pi / period))
    w = np.clip(s * (period / (3.0 * soft)) + 0.5, 0, 1)
    fade = min(max((period / soft - 2.0) / 2.0, 0.0), 1.0)
    return w if fade == 1.0 else 0.5 + fade * (w - 0.5)


@dataclass
class Shot:
    """Per-image draw parameters (pixels)."""

    view: str
    cx: float  # body centre x
    top: float  # top of the head y
    size: float  # person height in pixels
    phase: float  # walking phase (radians)
    stride: float  # walking amplitude (fraction of size)


def draw_person(cv: Canvas, p: Identity, s: Shot) -> None:
    """Draw one pedestrian on the canvas (back-to-front layering)."""
    S = s.size * p.height
    top = s.top + (s.size - S)
    cx = s.cx
    side = s.view in ("left", "right")
    face_dir = -1.0 if s.view == "left" else 1.0  # +1: facing image right
    bw = p.width * (0.62 if side else 1.0)  # width factor
    Y = lambda f: top + f * S

    sin_p = math.sin(s.phase)
    st = s.stride * S * (1.0 if side else 0.25)
    # key points
    sh_y, hip_y, knee_y, ank_y = Y(0.18), Y(0.50), Y(0.72), Y(0.935)
    sh_x = 0.125 * S * bw
    hip_x = 0.055 * S * p.width * (0.5 if side else 1.0)
    arm_r, leg_r = 0.034 * S, 0.046 * S
    sleeve = p.upper
    legs = []  # (hip, knee, ankle) for far then near leg
    for k, sgn in enumerate((-1.0, 1.0)):
        sw = sgn * sin_p
        hx = cx + (sgn * hip_x if not side else 0.0)
        kx = hx + (0.5 * st * sw if side else sgn * 0.004 * S)
        ax = hx + (st * sw if side else sgn * 0.01 * S + st * sw * 0.3)
        ky = knee_y - (0.0 if side else 0.01 * S * max(sw, 0))
        ay = ank_y - (0.012 * S * max(-sw, 0) if side else 0.015 * S * max(sw, 0))
        legs.append((hx, hip_y, kx, ky, ax, ay))
    arms = []
    for sgn in (-1.0, 1.0):
        sw = -sgn * sin_p
        sx = cx + (sgn * sh_x if not side else -face_dir * 0.01 * S)
        ex = sx + (0.5 * st * sw if side else sgn * 0.02 * S)
        hx_ = sx + (st * sw * 0.9 if side else sgn * 0.03 * S + st * sw * 0.2)
        arms.append((sx, sh_y + 0.02 * S, ex, Y(0.34), hx_, Y(0.47)))
    if side:  # far limbs drawn first (darker), near limbs after the torso
        far_arm, near_arm = arms[0], arms[1]
    else:
        far_arm, near_arm = None, None

    def draw_leg(leg, shade=1.0):
        hx, hy, kx, ky, ax, ay = leg
        lower = p.lower * shade
        skin = p.skin * shade
        cut = {"trousers": ay + 1, "shorts": Y(0.66), "skirt": Y(0.50)}[p.lower_type]
        for (x0, y0, x1, y1, r) in ((hx, hy, kx, ky, leg_r), (kx, ky, ax, ay, leg_r * 0.8)):
            res = cv.capsule(x0, y0, x1, y1, r)
            if res is None:
                continue
            win, al = res
            _, yy = cv.coords(win)
            col = np.where((yy < cut)[..., None], lower, skin)
            cv.paint(win, al, col)
        fwd = face_dir * 0.025 * S if side else 0.0
        res = cv.ellipse(ax + fwd, ay + 0.02 * S, 0.045 * S if side else 0.035 * S, 0.024 * S)
        if res is not None:
            cv.paint(*res, p.shoes * shade)

    def draw_arm(arm, shade=1.0):
        sx, sy, ex, ey, hx_, hy_ = arm
        up = sleeve * shade
        fore = (sleeve if p.long_sleeves else p.skin) * shade
        for (x0, y0, x1, y1, c, r) in ((sx, sy, ex, ey, up, arm_r), (ex, ey, hx_, hy_, fore, arm_r * 0.85)):
            res = cv.capsule(x0, y0, x1, y1, r)
            if res is not None:
                cv.paint(*res, c)
        res = cv.ellipse(hx_, hy_ + 0.01 * S, 0.026 * S, 0.03 * S)
        if res is not None:
            cv.paint(*res, p.skin * shade)

    def draw_bag_body():
        if p.bag == "backpack":
            if s.view == "back":
                res = cv.trapezoid(cx, Y(0.21), Y(0.41), 0.075 * S * p.width, 0.085 * S * p.width)
            elif side:
                bx = cx - face_dir * 0.11 * S
                res = cv.trapezoid(bx, Y(0.19), Y(0.43), 0.05 * S, 0.055 * S)
            else:
                return
            if res is not None:
                cv.paint(*res, p.bag_colour)
        elif p.bag == "shoulder":
            # which image side: person's right is image left in front view
            img_side = p.bag_side * (1 if s.view == "front" else -1)
            if side:
                visible_near = (p.bag_side > 0) == (s.view == "right")
                bx = cx + face_dir * 0.02 * S
                res = cv.trapezoid(bx, Y(0.44), Y(0.58), 0.06 * S, 0.065 * S)
                if res is not None:
                    cv.paint(*res, p.bag_colour * (1.0 if visible_near else 0.75))
                return
            bx = cx + img_side * 0.17 * S * p.width
            res = cv.trapezoid(bx, Y(0.45), Y(0.59), 0.055 * S, 0.06 * S)
            if res is not None:
                cv.paint(*res, p.bag_colour)

    def draw_straps():
        r = max(0.012 * S, 0.6)
        if p.bag == "backpack" and s.view == "front":
            for sgn in (-1, 1):
                res = cv.capsule(cx + sgn * 0.07 * S * bw, Y(0.17), cx + sgn * 0.075 * S * bw, Y(0.40), r)
                if res is not None:
                    cv.paint(*res, p.bag_colour)
        elif p.bag == "shoulder" and not side:
            img_side = p.bag_side * (1 if s.view == "front" else -1)
            res = cv.capsule(cx - img_side * 0.08 * S * bw, Y(0.17), cx + img_side * 0.15 * S * bw, Y(0.46), r)
            if res is not None:
                cv.paint(*res, p.bag_colour)

    # ---- back layers
    if p.hair_style == "long" and s.view in ("front", "left", "right"):
        res = cv.trapezoid(cx - (face_dir * 0.02 * S if side else 0), Y(0.05), Y(0.24), 0.07 * S, 0.085 * S)
        if res is not None:
            cv.paint(*res, p.hair)
    if side and p.bag == "shoulder" and not ((p.bag_side > 0) == (s.view == "right")):
        draw_bag_body()
    if side:
        draw_arm(far_arm, 0.8)
        draw_leg(legs[0], 0.85)
        draw_leg(legs[1])
    else:
        draw_leg(legs[0])
        draw_leg(legs[1])
    if p.lower_type == "skirt":
        res = cv.trapezoid(cx, Y(0.47), Y(0.66), 0.09 * S * bw, 0.15 * S * bw)
        if res is not None:
            cv.paint(*res, p.lower)
    elif not side:  # crotch / hips block
        res = cv.trapezoid(cx, Y(0.47), Y(0.57), 0.10 * S * p.width, 0.10 * S * p.width)
        if res is not None:
            cv.paint(*res, p.lower)

    # ---- neck and torso with its pattern
    res = cv.capsule(cx, Y(0.11), cx, Y(0.17), 0.03 * S)
    if res is not None:
        cv.paint(*res, p.skin)
    res = cv.trapezoid(cx, Y(0.155), Y(0.515), 0.13 * S * bw, 0.105 * S * bw)
    if res is not None:
        win, al = res
        xx, yy = cv.coords(win)
        pat = p.upper_pattern
        if pat == "stripes":
            m = _soft_wave(yy - Y(0.155), 0.09 * S, cv.soft)
        elif pat == "checks":
            a = _soft_wave(yy - Y(0.155), 0.11 * S, cv.soft)
            b = _soft_wave(xx - cx, 0.11 * S, cv.soft)
            m = np.abs(a - b)
        elif pat == "logo" and s.view == "front":
            m = _cov((np.sqrt(((xx - cx) / (0.06 * S)) ** 2 + ((yy - Y(0.29)) / (0.05 * S)) ** 2) - 1) * 0.05 * S,
                     cv.soft)
        elif pat == "jacket" and s.view == "front":
            m = _cov(np.abs(xx - cx) - 0.035 * S * bw, cv.soft)
        elif pat == "jacket" and side:
            m = _cov(face_dir * (cx - xx) + 0.075 * S * bw, cv.soft) * (yy > Y(0.18))
        else:
            m = None
        if m is None:
            cv.paint(win, al, p.upper)
        else:
            col = p.upper + m[..., None] * (p.upper2 - p.upper)
            cv.paint(win, al, col)
    draw_straps()
    if s.view == "back" or side:
        draw_bag_body()

    # ---- arms (front view: both at the sides; side: near arm over the torso)
    if side:
        draw_arm(near_arm)
    else:
        draw_arm(arms[0])
        draw_arm(arms[1])
    if not side and p.bag == "shoulder":
        draw_bag_body()

    # ---- head, hair, hat
    hr_x, hr_y = 0.056 * S * (0.92 if side else 1.0), 0.066 * S
    hc_y = Y(0.075)
    res = cv.ellipse(cx, hc_y, hr_x, hr_y)
    if res is not None:
        if s.view == "back":
            cv.paint(*res, p.hair if p.hair_style != "hat" else p.hair * 0.6 + p.skin * 0.4)
        elif side:
            win, al = res
            xx, yy = cv.coords(win)
            m = _cov(-face_dir * (cx - 0.01 * S * face_dir - xx), cv.soft)
            col = p.skin + m[..., None] * (p.hair - p.skin)
            cv.paint(win, al, col)
        else:
            cv.paint(*res, p.skin)
    if p.hair_style == "hat":
        res = cv.ellipse(cx, hc_y - 0.03 * S, hr_x * 1.08, hr_y * 0.62)
        if res is not None:
            cv.paint(*res, p.hat)
        if side:
            res = cv.capsule(cx, hc_y - 0.015 * S, cx + face_dir * 0.08 * S, hc_y - 0.012 * S, 0.011 * S)
            if res is not None:
                cv.paint(*res, p.hat)
    elif s.view != "back":
        res = cv.ellipse(cx - (face_dir * 0.01 * S if side else 0), hc_y - 0.03 * S, hr_x * 1.03, hr_y * 0.6)
        if res is not None:
            cv.paint(*res, p.hair)
    elif p.hair_style == "long":
        res = cv.trapezoid(cx, Y(0.07), Y(0.25), 0.06 * S, 0.08 * S)
        if res is not None:
            cv.paint(*res, p.hair)


# ------------------------------------------------------------------------------------------- render
@dataclass(frozen=True)
class ShotSpec:
    """Everything that determines one image: who, where, and the seed of its own random generator."""

    split: str  # train | query | gallery
    pid: int  # -1 junk, 0 distractor
    cam: int  # 0-based
    seq: int  # 1-based sequence number (name field sS)
    frame: int
    bbox: int
    key: tuple[int, ...]  # seed of the per-image generator (seed, domain, role, ...)
    tracklet: tuple[int, ...]  # seed of the tracklet generator (shared by frames of one tracklet)
    ident_key: tuple[int, ...]  # seed of the identity generator
    kind: str = "person"  # person | junk

    @property
    def name(self) -> str:
        pid = "-1" if self.pid < 0 else f"{self.pid:04d}"
        return f"{pid}_c{self.cam + 1}s{self.seq}_{self.frame:06d}_{self.bbox:02d}.jpg"


class Renderer:
    """Draws the images of one domain at one size (cameras and identities cached)."""

    def __init__(self, domain: str, height: int, width: int, knobs: Knobs = KNOBS) -> None:
        self.style = STYLES[domain]
        self.h, self.w = height, width
        self.knobs = knobs
        self.cams = [make_camera(self.style, i, height, width, knobs) for i in range(self.style.num_cams)]
        self._ids: dict[tuple[int, ...], Identity] = {}
        self._ramp = (0.5 - (np.arange(height, dtype=np.float32) + 0.5) / height)[:, None, None]
        # sensor noise: windows of one fixed tile (drawing fresh normals per image costs more than the person)
        tile = np.random.default_rng([7920, DOMAINS.index(domain), height, width]).standard_normal(
            (3 * height, 3 * width, 3), dtype=np.float32)
        self._noise = tile
        self._noise_std = float(tile.std())

    def identity(self, key: tuple[int, ...]) -> Identity:
        ident = self._ids.get(key)
        if ident is None:
            ident = make_identity(self.style, np.random.default_rng(list(key)), self.knobs)
            self._ids[key] = ident
        return ident

    def _shot(self, cam: Camera, trk: np.random.Generator, rng: np.random.Generator, size_scale: float) -> Shot:
        view = VIEWS[int(trk.choice(4, p=cam.view_p))]
        lo, hi = self.style.person_scale
        base = trk.uniform(lo, hi) * cam.scale * size_scale
        size = self.h * base * rng.uniform(0.97, 1.03)
        k = self.knobs
        cx = self.w / 2 + (trk.uniform(-k.shift, k.shift) + rng.uniform(-0.02, 0.02)) * self.w
        slack = self.h - size
        top = slack * trk.uniform(0.2, 0.8) + rng.normal(0, k.crop) * size
        return Shot(view=view, cx=cx, top=top, size=size, phase=float(rng.uniform(0, 2 * np.pi)),
                    stride=float(rng.uniform(0.06, 0.11)))

    def render(self, spec: ShotSpec) -> np.ndarray:
        """The image of one shot as uint8 [H, W, 3]."""
        cam = self.cams[spec.cam]
        rng = np.random.default_rng(list(spec.key))
        trk = np.random.default_rng(list(spec.tracklet))
        k = self.knobs
        pad = cam.pad
        oy, ox = int(trk.integers(0, 2 * pad + 1)), int(trk.integers(0, 2 * pad + 1))
        img = cam.background[oy:oy + self.h, ox:ox + self.w].copy()
        cv = Canvas(img, cam.soft)
        if spec.kind == "junk":
            self._junk(cv, rng)
        else:
            person = self.identity(spec.ident_key)
            shot = self._shot(cam, trk, rng, 1.0)
            if self.style.sun:  # sunlight from the left or the right of this tracklet
                cv.set_light(self.style.sun * (1.0 if trk.random() < 0.5 else -1.0), shot.cx, 0.15 * shot.size)
            occ = rng.random() < self.style.occluder_p
            other_first = occ and rng.random() < k.other_person_p
            if other_first:  # another pedestrian partly in view, behind or in front
                other = make_identity(self.style, rng, k)
                o_shot = self._shot(cam, rng, rng, 1.0)
                o_shot.cx = shot.cx + rng.choice([-1, 1]) * rng.uniform(0.45, 0.7) * self.w
                behind = rng.random() < 0.5
                if behind:
                    draw_person(cv, other, o_shot)
                    draw_person(cv, person, shot)
                else:
                    draw_person(cv, person, shot)
                    draw_person(cv, other, o_shot)
            else:
                draw_person(cv, person, shot)
                if occ:
                    self._occluder(cv, rng)
        return self._finish(img, cam, trk, rng)

    def _junk(self, cv: Canvas, rng: np.random.Generator) -> None:
        """Market-style junk: a badly-cropped detection (part of a random person, or background only)."""
        if rng.random() < 0.7:
            other = make_identity(self.style, rng, self.knobs)
            size = self.h * rng.uniform(1.3, 2.2)
            shot = Shot(view=VIEWS[int(rng.integers(4))], cx=self.w * rng.uniform(0.1, 0.9),
                        top=-rng.uniform(0.1, 0.6) * size, size=size, phase=float(rng.uniform(0, 6.3)),
                        stride=0.08)
            draw_person(cv, other, shot)

    def _occluder(self, cv: Canvas, rng: np.random.Generator) -> None:
        colour = np.clip(rng.uniform(0.15, 0.75, 3), 0, 1).astype(np.float32)
        if rng.random() < 0.55:  # low wall / bench / car in front of the legs
            y0 = self.h * rng.uniform(0.62, 0.85)
            res = cv.rect(-2, y0, self.w + 2, self.h + 2)
            if res is not None:
                win, al = res
                _, yy = cv.coords(win)
                shade = 1 - 0.15 * _soft_wave(yy - y0, max(3.0, 0.06 * self.h), cv.soft)
                cv.paint(win, al, colour * shade[..., None])
        else:  # pole / sign post
            x = self.w * rng.uniform(0.05, 0.95)
            hw = self.w * rng.uniform(0.05, 0.12)
            res = cv.rect(x - hw, -2, x + hw, self.h + 2)
            if res is not None:
                cv.paint(*res, colour)

    def _finish(self, img: np.ndarray, cam: Camera, trk: np.random.Generator, rng: np.random.Generator) -> np.ndarray:
        """Camera and domain imaging: illumination, cast, contrast, saturation and sensor noise.

        (Optics and resolution are not a pass here: the canvas draws band-limited edges of the camera's
        softness and the background is pre-blurred by the same amount, which costs nothing per image.)

        The colour part is one affine map per pixel (gain x cast, then saturation and contrast around
        mid grey), applied as a 3x3 matrix product; noise is a random window of a per-renderer noise tile.
        """
        st, k = self.style, self.knobs
        gain = st.light_gain * cam.gain * trk.uniform(*k.shot_gain)
        cast = np.asarray(st.light_cast, np.float32) * cam.cast * np.exp(trk.normal(0, k.shot_tint, 3)).astype(np.float32)
        # vertical light gradient (light from above) of per-shot strength
        img *= (1.0 + trk.uniform(0.0, 0.12) * self._ramp)
        sat, con = st.saturation, st.contrast
        mix = np.full((3, 3), (1.0 - sat) / 3.0, np.float32) + sat * np.eye(3, dtype=np.float32)
        m = (con * mix) @ np.diag(gain * cast).astype(np.float32)  # out = m @ rgb + b
        b = np.float32(0.45 * (1.0 - con))
        oy, ox = int(rng.integers(0, self.h * 2)), int(rng.integers(0, self.w * 2))
        noise = self._noise[oy:oy + self.h, ox:ox + self.w]
        out = img.reshape(-1, 3) @ m.T
        out = out.reshape(self.h, self.w, 3)
        out += noise * np.float32(cam.noise / self._noise_std)
        out += b
        return _to_u8(out)


def _to_u8(img: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 (rounded, clipped); modifies ``img``."""
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 [H, W, 3] array (fixed settings, so deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ schedule
def _schedule(domain: str, ids: int, test_ids: int, seed: int) -> list[ShotSpec]:
    """All shots of a domain: train / query / gallery people, gallery distractors and junk."""
    style = STYLES[domain]
    d = DOMAINS.index(domain)
    ncam = style.num_cams
    rng = np.random.default_rng([seed, d, 0])
    perm = rng.permutation(np.arange(1, ids + test_ids + 1))
    train_pids = sorted(int(p) for p in perm[:ids])
    test_pids = sorted(int(p) for p in perm[ids:])
    specs: list[ShotSpec] = []
    ncam_p = np.array([0.30, 0.30, 0.20, 0.12, 0.08, 0.05, 0.03][: ncam - 1], np.float64)
    ncam_p /= ncam_p.sum()

    def person_shots(pid: int, test: bool) -> list[ShotSpec]:
        prng = np.random.default_rng([seed, d, 1, pid])
        n = 2 + int(prng.choice(len(ncam_p), p=ncam_p))
        cams = sorted(int(c) for c in prng.choice(ncam, n, replace=False))
        out: list[ShotSpec] = []
        for cam in cams:
            ntrk = 1 + int(prng.random() < 0.35)
            frames: list[tuple[int, int]] = []
            for t in range(ntrk):
                nf = int(prng.integers(1, 5))
                start = int(prng.integers(0, 200000))
                step = int(prng.integers(5, 40))
                frames += [(t, start + j * step) for j in range(nf)]
            if test and len(frames) < 2:  # one query + at least one gallery image per camera
                t, f0 = frames[-1]
                frames.append((t, f0 + 17))
            for j, (t, frame) in enumerate(frames):
                out.append(ShotSpec(
                    split="train", pid=pid, cam=cam, seq=t + 1, frame=frame, bbox=1,
                    key=(seed, d, 2, pid, cam, j), tracklet=(seed, d, 3, pid, cam, t), ident_key=(seed, d, 1, pid)))
        return out

    for pid in train_pids:
        specs += person_shots(pid, test=False)
    n_test = 0
    for pid in test_pids:
        shots = person_shots(pid, test=True)
        qrng = np.random.default_rng([seed, d, 4, pid])
        by_cam: dict[int, list[int]] = {}
        for i, s in enumerate(shots):
            by_cam.setdefault(s.cam, []).append(i)
        query = {int(qrng.choice(v)) for v in by_cam.values()}
        for i, s in enumerate(shots):
            specs.append(_replace(s, split="query" if i in query else "gallery"))
        n_test += len(shots)
    # distractors (pid 0: people not in the query set) and junk (pid -1: bad detections), as in Market
    n_dis = max(1, int(round(0.08 * n_test)))
    n_junk = max(1, int(round(0.03 * n_test)))
    for j in range(n_dis):
        cam = int(rng.integers(ncam))
        specs.append(ShotSpec(split="gallery", pid=0, cam=cam, seq=1, frame=300000 + j, bbox=1,
                              key=(seed, d, 5, j), tracklet=(seed, d, 6, j), ident_key=(seed, d, 7, j)))
    for j in range(n_junk):
        cam = int(rng.integers(ncam))
        specs.append(ShotSpec(split="gallery", pid=-1, cam=cam, seq=1, frame=400000 + j, bbox=1,
                              key=(seed, d, 8, j), tracklet=(seed, d, 9, j), ident_key=(seed, d, 10, j),
                              kind="junk"))
    return specs


def _replace(s: ShotSpec, **kw: Any) -> ShotSpec:
    from dataclasses import replace

    return replace(s, **kw)


# ------------------------------------------------------------------------------------------ public API
def _validate(domain: str, ids: int, test_ids: int, seed: int, height: int, width: int) -> None:
    if domain not in DOMAINS:
        raise DataError(f"synthetic domain {domain!r}: expected one of {', '.join(DOMAINS)}")
    for key, val, lo in (("ids", ids, 1), ("test_ids", test_ids, 1), ("height", height, MIN_HEIGHT),
                         ("width", width, MIN_WIDTH)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
            raise DataError(f"synthetic data: {key} must be an integer >= {lo}, got {val!r}")
    if ids + test_ids > 9999:
        raise DataError(f"synthetic data: ids + test_ids must be <= 9999 (4-digit pids), got {ids + test_ids}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic data: seed must be a non-negative integer, got {seed!r}")


def _split_stats(specs: list[ShotSpec]) -> dict[str, int]:
    people = [s for s in specs if s.pid > 0]
    return {"images": len(specs), "identities": len({s.pid for s in people}),
            "cameras": len({s.cam for s in specs})}


def write_domain(domain: str, out: Union[str, Path], ids: int = 200, test_ids: int = 100, seed: int = 0,
                 height: int = 128, width: int = 64) -> dict[str, Any]:
    """Write one synthetic domain in the Market-1501 layout under ``out`` (atomically) and return stats.

    ``ids`` training identities and ``test_ids`` disjoint query/gallery identities; every test identity
    is seen by >= 2 cameras with >= 2 images per camera, and the query holds one image per (identity,
    camera), so every query has a cross-camera match in the gallery. The gallery also holds distractors
    (pid 0000, ~8 % of the test images) and junk detections (pid -1, ~3 %). Same arguments -> same bytes.

    Returns ``{"version", "domain", "seed", "height", "width", "train": {...}, "query": {...},
    "gallery": {..., "distractors", "junk"}, "images", "seconds", "images_per_s"}`` where each split
    dict has ``images``, ``identities`` (pid > 0) and ``cameras``.
    """
    _validate(domain, ids, test_ids, seed, height, width)
    specs = _schedule(domain, int(ids), int(test_ids), int(seed))
    renderer = Renderer(domain, int(height), int(width))
    quality = renderer.style.jpeg_quality
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = specs if tqdm is None else tqdm(specs, desc=f"synth {domain}", unit="img", leave=False,
                                         disable=None)
    with output_dir(str(out), "synthetic-data") as tmp:
        for sub in SPLIT_DIRS.values():
            (tmp / sub).mkdir()
        for spec in it:
            data = encode_jpeg(renderer.render(spec), quality)
            (tmp / SPLIT_DIRS[spec.split] / spec.name).write_bytes(data)
    secs = time.perf_counter() - t0
    by = {k: [s for s in specs if s.split == k] for k in SPLIT_DIRS}
    gal = _split_stats(by["gallery"])
    gal["distractors"] = sum(1 for s in by["gallery"] if s.pid == 0)
    gal["junk"] = sum(1 for s in by["gallery"] if s.pid < 0)
    return {
        "version": GENERATOR_VERSION, "domain": domain, "seed": int(seed), "height": int(height),
        "width": int(width), "train": _split_stats(by["train"]), "query": _split_stats(by["query"]),
        "gallery": gal, "images": len(specs), "seconds": round(secs, 3),
        "images_per_s": round(len(specs) / max(secs, 1e-9), 1),
    }


def render_examples(domain: str, pids: list[int], cams: list[int], seed: int = 0, height: int = 128,
                    width: int = 64, shot: int = 0) -> np.ndarray:
    """Images of identities ``pids`` in cameras ``cams`` (0-based) as uint8 [len(pids), len(cams), H, W, 3].

    Used by the contact sheet; identities are drawn exactly as ``write_domain`` draws pid ``p``.
    """
    _validate(domain, max(pids), 1, seed, height, width)
    r = Renderer(domain, height, width)
    d = DOMAINS.index(domain)
    outp = np.zeros((len(pids), len(cams), height, width, 3), np.uint8)
    for i, pid in enumerate(pids):
        for j, cam in enumerate(cams):
            spec = ShotSpec(split="train", pid=pid, cam=cam, seq=1, frame=0, bbox=1,
                            key=(seed, d, 2, pid, cam, shot), tracklet=(seed, d, 3, pid, cam, shot),
                            ident_key=(seed, d, 1, pid))
            outp[i, j] = r.render(spec)
    return outp
