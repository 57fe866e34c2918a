"""Drawing one pedestrian on a canvas, body part by body part (back-to-front layering)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .canvas import Canvas, coverage, soft_wave
from .identity import Identity


@dataclass
class Shot:
    """Per-image draw parameters (pixels)."""

    view: str
    cx: float  # body centre x
    top: float  # top of the head y
    size: float  # person height in pixels
    phase: float  # walking phase (radians)
    stride: float  # walking amplitude (fraction of size)


Joint = tuple[float, float, float, float, float, float]  # leg: hip, knee, ankle; arm: shoulder, elbow, hand


@dataclass
class Pose:
    """Pixel geometry of one pedestrian in one shot: size, centre, facing and limb joints."""

    S: float  # drawn height in pixels (shot size x the identity's height)
    top: float  # top of the head y
    cx: float  # body centre x
    side: bool  # seen from the left or the right
    face_dir: float  # +1: facing image right, -1: facing image left
    bw: float  # body width factor (narrower from the side)
    arm_r: float
    leg_r: float
    legs: list[Joint]  # far leg, near leg (x, y of hip, knee, ankle)
    arms: list[Joint]  # far arm, near arm in side views (x, y of shoulder, elbow, hand)

    def y(self, f: float) -> float:
        """Image y of the fraction ``f`` of the body height below the top of the head."""
        return self.top + f * self.S


def pose(p: Identity, s: Shot) -> Pose:
    """Where the body parts of ``p`` go in shot ``s`` (walking phase, stride and view)."""
    S = s.size * p.height
    top = s.top + (s.size - S)
    cx = s.cx
    side = s.view in ("left", "right")
    face_dir = -1.0 if s.view == "left" else 1.0
    bw = p.width * (0.62 if side else 1.0)
    Y = lambda f: top + f * S

    sin_p = math.sin(s.phase)
    st = s.stride * S * (1.0 if side else 0.25)
    sh_y, hip_y, knee_y, ank_y = Y(0.18), Y(0.50), Y(0.72), Y(0.935)
    sh_x = 0.125 * S * bw
    hip_x = 0.055 * S * p.width * (0.5 if side else 1.0)
    legs: list[Joint] = []
    for sgn in (-1.0, 1.0):
        sw = sgn * sin_p
        hx = cx + (sgn * hip_x if not side else 0.0)
        kx = hx + (0.5 * st * sw if side else sgn * 0.004 * S)
        ax = hx + (st * sw if side else sgn * 0.01 * S + st * sw * 0.3)
        ky = knee_y - (0.0 if side else 0.01 * S * max(sw, 0))
        ay = ank_y - (0.012 * S * max(-sw, 0) if side else 0.015 * S * max(sw, 0))
        legs.append((hx, hip_y, kx, ky, ax, ay))
    arms: list[Joint] = []
    for sgn in (-1.0, 1.0):
        sw = -sgn * sin_p
        sx = cx + (sgn * sh_x if not side else -face_dir * 0.01 * S)
        ex = sx + (0.5 * st * sw if side else sgn * 0.02 * S)
        hx_ = sx + (st * sw * 0.9 if side else sgn * 0.03 * S + st * sw * 0.2)
        arms.append((sx, sh_y + 0.02 * S, ex, Y(0.34), hx_, Y(0.47)))
    return Pose(S=S, top=top, cx=cx, side=side, face_dir=face_dir, bw=bw, arm_r=0.034 * S, leg_r=0.046 * S,
                legs=legs, arms=arms)


def draw_person(cv: Canvas, p: Identity, s: Shot) -> None:
    """Draw one pedestrian on the canvas (back-to-front layering)."""
    b = pose(p, s)
    draw_long_hair_behind(cv, p, s, b)
    if b.side and p.bag == "shoulder" and not ((p.bag_side > 0) == (s.view == "right")):
        draw_bag_body(cv, p, s, b)  # a shoulder bag on the far side is behind the body
    if b.side:  # far limbs drawn first (darker), near limbs after the torso
        draw_arm(cv, p, b, b.arms[0], 0.8)
        draw_leg(cv, p, b, b.legs[0], 0.85)
        draw_leg(cv, p, b, b.legs[1])
    else:
        draw_leg(cv, p, b, b.legs[0])
        draw_leg(cv, p, b, b.legs[1])
    draw_hips(cv, p, b)
    draw_torso(cv, p, s, b)
    draw_straps(cv, p, s, b)
    if s.view == "back" or b.side:
        draw_bag_body(cv, p, s, b)
    # arms (front view: both at the sides; side: near arm over the torso)
    if b.side:
        draw_arm(cv, p, b, b.arms[1])
    else:
        draw_arm(cv, p, b, b.arms[0])
        draw_arm(cv, p, b, b.arms[1])
    if not b.side and p.bag == "shoulder":
        draw_bag_body(cv, p, s, b)
    draw_head(cv, p, s, b)


def draw_leg(cv: Canvas, p: Identity, b: Pose, leg: Joint, shade: float = 1.0) -> None:
    """Thigh and shin (garment above the hem, skin below) and the shoe."""
    S, side, face_dir = b.S, b.side, b.face_dir
    hx, hy, kx, ky, ax, ay = leg
    lower = p.lower * shade
    skin = p.skin * shade
    cut = {"trousers": ay + 1, "shorts": b.y(0.66), "skirt": b.y(0.50)}[p.lower_type]
    for (x0, y0, x1, y1, r) in ((hx, hy, kx, ky, b.leg_r), (kx, ky, ax, ay, b.leg_r * 0.8)):
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


def draw_arm(cv: Canvas, p: Identity, b: Pose, arm: Joint, shade: float = 1.0) -> None:
    """Upper arm (sleeve), forearm (sleeve or skin) and hand."""
    S = b.S
    sx, sy, ex, ey, hx_, hy_ = arm
    up = p.upper * shade
    fore = (p.upper if p.long_sleeves else p.skin) * shade
    for (x0, y0, x1, y1, c, r) in ((sx, sy, ex, ey, up, b.arm_r), (ex, ey, hx_, hy_, fore, b.arm_r * 0.85)):
        res = cv.capsule(x0, y0, x1, y1, r)
        if res is not None:
            cv.paint(*res, c)
    res = cv.ellipse(hx_, hy_ + 0.01 * S, 0.026 * S, 0.03 * S)
    if res is not None:
        cv.paint(*res, p.skin * shade)


def draw_bag_body(cv: Canvas, p: Identity, s: Shot, b: Pose) -> None:
    """The bag itself (a backpack is seen from the back and the side, a shoulder bag from everywhere)."""
    S, cx, side, face_dir, Y = b.S, b.cx, b.side, b.face_dir, b.y
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


def draw_straps(cv: Canvas, p: Identity, s: Shot, b: Pose) -> None:
    """Backpack straps (front view) or the shoulder bag's strap across the torso (front and back views)."""
    S, cx, bw, Y = b.S, b.cx, b.bw, b.y
    r = max(0.012 * S, 0.6)
    if p.bag == "backpack" and s.view == "front":
        for sgn in (-1, 1):
            res = cv.capsule(cx + sgn * 0.07 * S * bw, Y(0.17), cx + sgn * 0.075 * S * bw, Y(0.40), r)
            if res is not None:
                cv.paint(*res, p.bag_colour)
    elif p.bag == "shoulder" and not b.side:
        img_side = p.bag_side * (1 if s.view == "front" else -1)
        res = cv.capsule(cx - img_side * 0.08 * S * bw, Y(0.17), cx + img_side * 0.15 * S * bw, Y(0.46), r)
        if res is not None:
            cv.paint(*res, p.bag_colour)


def draw_long_hair_behind(cv: Canvas, p: Identity, s: Shot, b: Pose) -> None:
    """Long hair falling behind the shoulders (hidden by the body unless seen from the back)."""
    S = b.S
    if p.hair_style == "long" and s.view in ("front", "left", "right"):
        res = cv.trapezoid(b.cx - (b.face_dir * 0.02 * S if b.side else 0), b.y(0.05), b.y(0.24), 0.07 * S,
                           0.085 * S)
        if res is not None:
            cv.paint(*res, p.hair)


def draw_hips(cv: Canvas, p: Identity, b: Pose) -> None:
    """The skirt, or (front and back views) the hips block joining the legs."""
    S, cx, Y = b.S, b.cx, b.y
    if p.lower_type == "skirt":
        res = cv.trapezoid(cx, Y(0.47), Y(0.66), 0.09 * S * b.bw, 0.15 * S * b.bw)
        if res is not None:
            cv.paint(*res, p.lower)
    elif not b.side:  # crotch / hips block
        res = cv.trapezoid(cx, Y(0.47), Y(0.57), 0.10 * S * p.width, 0.10 * S * p.width)
        if res is not None:
            cv.paint(*res, p.lower)


def draw_torso(cv: Canvas, p: Identity, s: Shot, b: Pose) -> None:
    """The neck and the upper garment with its pattern."""
    S, cx, Y = b.S, b.cx, b.y
    res = cv.capsule(cx, Y(0.11), cx, Y(0.17), 0.03 * S)
    if res is not None:
        cv.paint(*res, p.skin)
    res = cv.trapezoid(cx, Y(0.155), Y(0.515), 0.13 * S * b.bw, 0.105 * S * b.bw)
    if res is not None:
        win, al = res
        xx, yy = cv.coords(win)
        m = upper_pattern(cv, p, s, b, xx, yy)
        if m is None:
            cv.paint(win, al, p.upper)
        else:
            col = p.upper + m[..., None] * (p.upper2 - p.upper)
            cv.paint(win, al, col)


def upper_pattern(cv: Canvas, p: Identity, s: Shot, b: Pose, xx: np.ndarray, yy: np.ndarray) -> Optional[np.ndarray]:
    """Weight of the second garment colour at pixels ``xx``, ``yy`` of the torso, or None for a plain top."""
    S, cx, bw, Y = b.S, b.cx, b.bw, b.y
    pat = p.upper_pattern
    if pat == "stripes":
        return soft_wave(yy - Y(0.155), 0.09 * S, cv.soft)
    if pat == "checks":
        a = soft_wave(yy - Y(0.155), 0.11 * S, cv.soft)
        c = soft_wave(xx - cx, 0.11 * S, cv.soft)
        return np.abs(a - c)
    if pat == "logo" and s.view == "front":
        return coverage((np.sqrt(((xx - cx) / (0.06 * S)) ** 2 + ((yy - Y(0.29)) / (0.05 * S)) ** 2) - 1) * 0.05 * S,
                    cv.soft)
    if pat == "jacket" and s.view == "front":
        return coverage(np.abs(xx - cx) - 0.035 * S * bw, cv.soft)
    if pat == "jacket" and b.side:
        return coverage(b.face_dir * (cx - xx) + 0.075 * S * bw, cv.soft) * (yy > Y(0.18))
    return None


def draw_head(cv: Canvas, p: Identity, s: Shot, b: Pose) -> None:
    """Head (face, back of the head or profile), then the hair or the hat."""
    S, cx, side, face_dir, Y = b.S, b.cx, b.side, b.face_dir, b.y
    hr_x, hr_y = 0.056 * S * (0.92 if side else 1.0), 0.066 * S
    hc_y = Y(0.075)
    res = cv.ellipse(cx, hc_y, hr_x, hr_y)
    if res is not None:
        if s.view == "back":
            cv.paint(*res, p.hair if p.hair_style != "hat" else p.hair * 0.6 + p.skin * 0.4)
        elif side:
            win, al = res
            xx, yy = cv.coords(win)
            m = coverage(-face_dir * (cx - 0.01 * S * face_dir - xx), cv.soft)
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
