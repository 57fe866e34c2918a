"""Rendering one image: the person (or junk) in its camera's scene, then the camera's imaging."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import Camera, make_camera
from .canvas import Canvas, soft_wave
from .identity import Identity, make_identity
from .person import Shot, draw_person
from .styles import DOMAINS, KNOBS, STYLES, VIEWS, DomainStyle, Knobs


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

    def __init__(self, domain: str, height: int, width: int, knobs: Knobs = KNOBS,
                 style: DomainStyle | None = None) -> None:
        self.style = STYLES[domain] if style is None else style
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
                shade = 1 - 0.15 * soft_wave(yy - y0, max(3.0, 0.06 * self.h), cv.soft)
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

