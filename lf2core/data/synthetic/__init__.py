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

The package: ``styles`` (attribute tables, domain styles, calibration knobs), ``identity`` (one person's
attributes), ``camera`` (per-camera imaging and backgrounds), ``canvas`` (SDF primitives), ``person``
(drawing a pedestrian part by part), ``render`` (one image: scene, person, imaging), ``schedule`` (which
images a domain holds); this module holds the public API and the dataset writer.

Change anything that alters the output -> bump ``GENERATOR_VERSION`` (recorded with every result).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from ...errors import DataError
from ...storage import output_dir
from .camera import Camera, make_camera
from .canvas import Canvas
from .identity import Identity, make_identity
from .person import Shot, draw_person
from .render import Renderer, ShotSpec
from .schedule import schedule
from .styles import (BAGS, COLOUR_NAMES, COLOURS, DOMAINS, HAIR, HAIR_STYLES, KNOBS, LOWER_TYPES, SKIN, STYLES,
                     UPPER_PATTERNS, VERSIONS, VIEWS, STYLES_BY_VERSION, DomainStyle, Knobs)

__all__ = [
    "BAGS", "COLOURS", "COLOUR_NAMES", "DOMAINS", "GENERATOR_VERSION", "HAIR", "HAIR_STYLES", "KNOBS",
    "LOWER_TYPES", "MIN_HEIGHT", "MIN_WIDTH", "SKIN", "SPLIT_DIRS", "STYLES", "STYLES_BY_VERSION", "UPPER_PATTERNS",
    "VERSIONS", "VIEWS", "Camera",
    "Canvas", "DomainStyle", "Identity", "Knobs", "Renderer", "Shot", "ShotSpec", "draw_person", "encode_jpeg",
    "make_camera", "make_identity", "render_examples", "write_domain",
]

GENERATOR_VERSION = "1.2"  # the default; every version of VERSIONS stays generable

SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MIN_HEIGHT, MIN_WIDTH = 32, 16


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 [H, W, 3] array (fixed settings, so deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ public API
def _validate(domain: str, ids: int, test_ids: int, seed: int, height: int, width: int,
              version: str = GENERATOR_VERSION) -> DomainStyle:
    """The domain's style of ``version``; DataError naming the bad argument."""
    if version not in VERSIONS:
        raise DataError(f"synthetic data: version must be one of {', '.join(VERSIONS)}, got {version!r}")
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
    return STYLES_BY_VERSION[version][domain]


def _split_stats(specs: list[ShotSpec]) -> dict[str, int]:
    people = [s for s in specs if s.pid > 0]
    return {"images": len(specs), "identities": len({s.pid for s in people}),
            "cameras": len({s.cam for s in specs})}


LAYOUTS = ("market1501", "msmt17")
#: the MSMT17 V1 layout: image folders per split and the list files the loader reads (train = train + val)
MSMT_DIRS = {"train": "train", "query": "test", "gallery": "test"}
MSMT_LISTS = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt",
              "gallery": "list_gallery.txt"}


def write_domain(domain: str, out: Union[str, Path], ids: int = 200, test_ids: int = 100, seed: int = 0,
                 height: int = 128, width: int = 64, layout: str = "market1501",
                 version: str = GENERATOR_VERSION) -> dict[str, Any]:
    """Write one synthetic domain under ``out`` (atomically) and return stats.

    ``layout``: ``market1501`` (``bounding_box_train/``, ``query/``, ``bounding_box_test/``) or ``msmt17``
    (MSMT17 V1: ``train/`` and ``test/`` with a folder per identity, ``list_{train,val,query,gallery}.txt``
    of ``relative/path.jpg label`` lines, names ``LLLL_NNN_CC_synth_FFFF_0.jpg``). MSMT17 has no
    distractors or junk, so that layout leaves them out, numbers the training and the test identities
    from 0 separately (as MSMT17 does) and puts every 10th training identity in ``list_val.txt``.

    ``ids`` training identities and ``test_ids`` disjoint query/gallery identities; every test identity
    is seen by >= 2 cameras with >= 2 images per camera, and the query holds one image per (identity,
    camera), so every query has a cross-camera match in the gallery. The gallery also holds distractors
    (pid 0000: ~8 % of the test images in v1.1, ~17 % in v1.2, as Market-1501) and junk detections (pid -1,
    ~3 %). ``version``: the generator version to draw (``VERSIONS``). Same arguments -> same bytes.

    Returns ``{"version", "domain", "seed", "height", "width", "train": {...}, "query": {...},
    "gallery": {..., "distractors", "junk"}, "images", "seconds", "images_per_s"}`` where each split
    dict has ``images``, ``identities`` (pid > 0) and ``cameras``.
    """
    style = _validate(domain, ids, test_ids, seed, height, width, version)
    if layout not in LAYOUTS:
        raise DataError(f"synthetic data: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    specs = schedule(domain, int(ids), int(test_ids), int(seed), style)
    if layout == "msmt17":
        specs = [s for s in specs if s.pid > 0]
    renderer = Renderer(domain, int(height), int(width), style=style)
    quality = renderer.style.jpeg_quality
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = specs if tqdm is None else tqdm(specs, desc=f"synth {domain}", unit="img", leave=False,
                                         disable=None)
    with output_dir(str(out), "synthetic-data") as tmp:
        place = _msmt_places(specs) if layout == "msmt17" else None
        for sub in (MSMT_DIRS if place else SPLIT_DIRS).values():
            (tmp / sub).mkdir(exist_ok=True)
        for k, spec in enumerate(it):
            data = encode_jpeg(renderer.render(spec), quality)
            rel = Path(SPLIT_DIRS[spec.split]) / spec.name if place is None else place[k][0]
            (tmp / rel).parent.mkdir(exist_ok=True)
            (tmp / rel).write_bytes(data)
        if place is not None:
            lists: dict[str, list[str]] = {name: [] for name in MSMT_LISTS}
            for rel, label, which in place:
                lists[which].append(f"{rel.relative_to(rel.parts[0]).as_posix()} {label}")
            for which, name in MSMT_LISTS.items():
                (tmp / name).write_text("".join(line + "\n" for line in lists[which]))
    secs = time.perf_counter() - t0
    by = {k: [s for s in specs if s.split == k] for k in SPLIT_DIRS}
    gal = _split_stats(by["gallery"])
    gal["distractors"] = sum(1 for s in by["gallery"] if s.pid == 0)
    gal["junk"] = sum(1 for s in by["gallery"] if s.pid < 0)
    return {
        "version": version, "domain": domain, "seed": int(seed), "height": int(height),
        "width": int(width), "train": _split_stats(by["train"]), "query": _split_stats(by["query"]),
        "gallery": gal, "images": len(specs), "seconds": round(secs, 3),
        "images_per_s": round(len(specs) / max(secs, 1e-9), 1),
    }


def _msmt_places(specs: list[ShotSpec]) -> list[tuple[Path, int, str]]:
    """``(path relative to the root, list label, list name)`` of each spec in the MSMT17 V1 layout."""
    labels: dict[str, dict[int, int]] = {"train": {}, "test": {}}
    counts: dict[tuple[str, int], int] = {}
    out = []
    for s in specs:
        part = "train" if s.split == "train" else "test"
        label = labels[part].setdefault(s.pid, len(labels[part]))
        k = counts[(part, label)] = counts.get((part, label), -1) + 1
        name = f"{label:04d}_{k:03d}_{s.cam + 1:02d}_synth_{s.frame % 10000:04d}_0.jpg"
        which = ("val" if label % 10 == 9 else "train") if part == "train" else s.split
        out.append((Path(MSMT_DIRS[s.split]) / f"{label:04d}" / name, label, which))
    return out


def render_examples(domain: str, pids: list[int], cams: list[int], seed: int = 0, height: int = 128,
                    width: int = 64, shot: int = 0, version: str = GENERATOR_VERSION) -> np.ndarray:
    """Images of identities ``pids`` in cameras ``cams`` (0-based) as uint8 [len(pids), len(cams), H, W, 3].

    Used by the contact sheet; identities are drawn exactly as ``write_domain`` draws pid ``p``.
    """
    style = _validate(domain, max(pids), 1, seed, height, width, version)
    r = Renderer(domain, height, width, style=style)
    d = DOMAINS.index(domain)
    outp = np.zeros((len(pids), len(cams), height, width, 3), np.uint8)
    for i, pid in enumerate(pids):
        for j, cam in enumerate(cams):
            spec = ShotSpec(split="train", pid=pid, cam=cam, seq=1, frame=0, bbox=1,
                            key=(seed, d, 2, pid, cam, shot), tracklet=(seed, d, 3, pid, cam, shot),
                            ident_key=(seed, d, 1, pid))
            outp[i, j] = r.render(spec)
    return outp
