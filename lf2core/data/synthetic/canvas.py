"""The drawing surface: anti-aliased signed-distance-field primitives on small per-primitive windows."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


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
        return win, coverage(dist, self.soft)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float):
        win = self._window(cx - rx - 1, cy - ry - 1, cx + rx + 1, cy + ry + 1)
        if win is None:
            return None
        a, b, c, d = win
        nx = (self._xs[None, c:d] - cx) / rx
        ny = (self._ys[a:b, None] - cy) / ry
        dist = (np.sqrt(nx * nx + ny * ny) - 1.0) * min(rx, ry)
        return win, coverage(dist, self.soft)

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
        return win, coverage(dist, self.soft)

    def rect(self, x0: float, y0: float, x1: float, y1: float):
        return self.trapezoid((x0 + x1) / 2, y0, y1, (x1 - x0) / 2, (x1 - x0) / 2)

    def coords(self, win: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d = win
        return self._xs[None, c:d], self._ys[a:b, None]


def coverage(dist: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Coverage of a pixel whose centre is at signed distance ``dist`` (pixels) from an edge: a linear
    ramp ``soft`` pixels wide (1 = plain anti-aliasing; wider = optical blur / low resolution)."""
    c = dist * np.float32(-1.0 / soft) if soft != 1.0 else np.negative(dist)
    c += 0.5
    np.maximum(c, 0.0, out=c)
    np.minimum(c, 1.0, out=c)
    return c


def soft_wave(v: np.ndarray, period: float, soft: float = 1.0) -> np.ndarray:
    """Band-limited square wave in [0, 1] of ``v`` (pixels) with the given period (pixels).

    Edges are ``soft`` pixels wide; the contrast fades to 0 as the period approaches 2 * soft (what a
    camera of that resolution would still resolve)."""
    s = np.sin(v * (2 * np.pi / period))
    w = np.clip(s * (period / (3.0 * soft)) + 0.5, 0, 1)
    fade = min(max((period / soft - 2.0) / 2.0, 0.0), 1.0)
    return w if fade == 1.0 else 0.5 + fade * (w - 0.5)

