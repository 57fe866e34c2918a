"""Market-1501 and DukeMTMC-reID: three image folders, identity and camera in each file name."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import DataError
from .layout import Parsed, camera_from_number, find_layout, is_image, list_dir
from .samples import SPLIT_NAMES

MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)$")
DUKE_RE = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)$")


def parse_market_style(root: Path, fmt: str) -> Parsed:
    pattern = MARKET_RE if fmt == "market1501" else DUKE_RE
    example = "0002_c1s1_000451_00.jpg" if fmt == "market1501" else "0005_c2_f0046985.jpg"
    data_dir = find_layout(root, tuple(MARKET_FOLDERS.values()), fmt)
    out = Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    for split, folder in MARKET_FOLDERS.items():
        d = data_dir / folder
        if not d.is_dir():
            raise DataError(f"dataset root {data_dir}: {folder} is not a directory")
        for e in list_dir(d):
            if e.is_dir() or not is_image(e.name):
                out.skipped += 1
                continue
            path = Path(e.path)
            out.files.append(path)
            m = pattern.match(os.path.splitext(e.name)[0])
            if not m:
                out.problems.append(f"{path}: unparseable name for {fmt} (expected e.g. {example})")
                continue
            pid = int(m.group(1))
            camid = camera_from_number(m.group(2), path, out.problems)
            if camid is not None:
                out.add(split, path, pid, camid,
                        lambda: f"{path}: unparseable name: pid {pid} (only -1 may be negative)")
    return out


def market_or_duke(data_dir: Path) -> str:
    """``market1501`` or ``dukemtmc``: which naming most of the first 2,000 names of each folder follow."""
    votes = {"market1501": 0, "dukemtmc": 0}
    for folder in ("query", "bounding_box_test", "bounding_box_train"):
        for e in list_dir(data_dir / folder)[:2000]:
            stem = os.path.splitext(e.name)[0]
            votes["market1501"] += bool(MARKET_RE.match(stem))
            votes["dukemtmc"] += bool(DUKE_RE.match(stem))
    return "dukemtmc" if votes["dukemtmc"] > votes["market1501"] else "market1501"
