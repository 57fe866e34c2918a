"""Synthetic cameras: per-camera imaging parameters and the pre-blurred background of each camera."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .styles import DOMAINS, KNOBS, DomainStyle, Knobs


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
    view = rng.dirichlet([5, 5, style.side_views, style.side_views]) * 0.7 + np.array([0.35, 0.35, 0.15, 0.15]) * 0.3
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

