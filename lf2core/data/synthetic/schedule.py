"""Which images a domain holds: identities, cameras, tracklets and frames of every split."""

from __future__ import annotations

import dataclasses

import numpy as np

from .render import ShotSpec
from .styles import DOMAINS, STYLES, DomainStyle


def schedule(domain: str, ids: int, test_ids: int, seed: int, style: DomainStyle | None = None) -> list[ShotSpec]:
    """All shots of a domain (``style``: the domain's, default the current version's): train / query /
    gallery people, gallery distractors and junk."""
    style = STYLES[domain] if style is None else style
    d = DOMAINS.index(domain)
    ncam = style.num_cams
    rng = np.random.default_rng([seed, d, 0])
    perm = rng.permutation(np.arange(1, ids + test_ids + 1))
    train_pids = sorted(int(p) for p in perm[:ids])
    test_pids = sorted(int(p) for p in perm[ids:])
    specs: list[ShotSpec] = []
    ncam_p = np.array(style.cams_per_id_p[: ncam - 1], np.float64)
    ncam_p /= ncam_p.sum()
    for pid in train_pids:
        specs += _person_shots(seed, d, ncam, ncam_p, pid, False, style)
    n_test = 0
    for pid in test_pids:
        shots = _person_shots(seed, d, ncam, ncam_p, pid, True, style)
        qrng = np.random.default_rng([seed, d, 4, pid])
        by_cam: dict[int, list[int]] = {}
        for i, s in enumerate(shots):
            by_cam.setdefault(s.cam, []).append(i)
        query = {int(qrng.choice(v)) for v in by_cam.values()}
        for i, s in enumerate(shots):
            specs.append(dataclasses.replace(s, split="query" if i in query else "gallery"))
        n_test += len(shots)
    # distractors (pid 0: people not in the query set) and junk (pid -1: bad detections), as in Market
    n_dis = max(1, int(round(style.distractor_share * n_test)))
    n_junk = max(1, int(round(style.junk_share * n_test)))
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


def _person_shots(seed: int, d: int, ncam: int, ncam_p: np.ndarray, pid: int, test: bool,
                  style: DomainStyle) -> list[ShotSpec]:
    """The shots of identity ``pid``: its cameras (``2 + choice(ncam_p)`` of ``ncam``), tracklets and frames."""
    prng = np.random.default_rng([seed, d, 1, pid])
    n = 2 + int(prng.choice(len(ncam_p), p=ncam_p))
    cams = sorted(int(c) for c in prng.choice(ncam, n, replace=False))
    out: list[ShotSpec] = []
    for cam in cams:
        ntrk = 1 + int(prng.random() < style.second_tracklet_p)
        frames: list[tuple[int, int]] = []
        for t in range(ntrk):
            lo, hi = style.frames_per_tracklet
            nf = int(prng.integers(lo, hi + 1))
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
