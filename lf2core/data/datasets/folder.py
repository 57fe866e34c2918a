"""The generic ``folder`` format: ``{train,query,gallery}/<identity>/<image>`` or a ``manifest.csv``."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Optional

from ...errors import DataError
from .layout import IGNORED_DIRS, Parsed, find_layout, is_image, list_dir
from .samples import SPLIT_NAMES, UNLABELLED, Sample

FOLDER_CSV = "manifest.csv"
FOLDER_CSV_COLUMNS = ("split", "path", "pid", "camid")
# folder format: a "c" starting the name or following a non-alphanumeric character, then digits
CAMERA_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])c(\d+)")


def identity_mapping(names: set[str]) -> dict[str, int]:
    """Identity names -> pids: the integer itself when every name is an integer, else 0..n-1 in sorted order."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def folder_camera(filename: str) -> int:
    """Camera of a ``folder``-format image: ``c<N>`` token -> N-1, no token -> 0, ``c0`` -> ValueError."""
    m = CAMERA_TOKEN_RE.search(os.path.splitext(os.path.basename(filename))[0])
    if not m:
        return 0
    c = int(m.group(1))
    if c < 1:
        raise ValueError(f"camera token c{m.group(1)}: cameras are numbered from 1")
    return c - 1


def parse_folder_csv(data_dir: Path, csv_path: Path) -> Parsed:
    out = Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    rows: list[tuple[str, Path, str, int]] = []
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in FOLDER_CSV_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (need {','.join(FOLDER_CSV_COLUMNS)})")
            reader.fieldnames = header
            for lineno, row in enumerate(reader, 2):
                where = f"{csv_path}:{lineno}"
                split, rel = (row.get("split") or "").strip(), (row.get("path") or "").strip()
                pid, cam = (row.get("pid") or "").strip(), (row.get("camid") or "").strip()
                if split not in SPLIT_NAMES:
                    out.problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
                    continue
                if not rel:
                    out.problems.append(f"{where}: empty path")
                    continue
                if not pid and split != "train":
                    out.problems.append(f"{where}: empty pid ({split} images need an identity; "
                                        "only train images may be unlabelled)")
                    continue
                if not re.fullmatch(r"\d+", cam):
                    out.problems.append(f"{where}: camid {cam!r} is not a non-negative integer (0-based)")
                    continue
                if os.path.isabs(rel) or ".." in Path(rel).parts:
                    out.problems.append(f"{where}: path {rel!r} must be relative to {data_dir} (no '..')")
                    continue
                path = data_dir / rel
                out.files.append(path)
                if not path.is_file():
                    out.problems.append(f"{path} ({where}): listed but missing")
                    continue
                rows.append((split, path, pid, int(cam)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read CSV ({e})") from None
    mapping = identity_mapping({r[2] for r in rows if r[2]})
    for split, path, pid, cam in rows:
        if not pid:  # a train row without identity
            out.splits[split].append(Sample(str(path), UNLABELLED, cam))
            continue
        if mapping[pid] == -1:
            continue
        if mapping[pid] < -1:
            out.problems.append(f"{path}: negative pid {pid} (only -1, junk, may be negative)")
            continue
        out.splits[split].append(Sample(str(path), mapping[pid], cam))
    return out


def parse_folder(root: Path) -> Parsed:
    if (root / FOLDER_CSV).is_file():
        return parse_folder_csv(root, root / FOLDER_CSV)
    try:
        data_dir = find_layout(root, SPLIT_NAMES, "folder")
    except DataError:
        # a single sub-folder holding manifest.csv is accepted as well
        subs = [
            Path(e.path) for e in list_dir(root)
            if e.is_dir() and not e.name.startswith(".") and e.name not in IGNORED_DIRS
            and (Path(e.path) / FOLDER_CSV).is_file()
        ]
        if len(subs) == 1:
            return parse_folder_csv(subs[0], subs[0] / FOLDER_CSV)
        raise DataError(
            f"dataset root {root}: not a folder layout, need {FOLDER_CSV} or the folders "
            f"{', '.join(s for s in SPLIT_NAMES if not (root / s).is_dir())}"
        ) from None
    out = Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    found: list[tuple[str, Path, Optional[str]]] = []  # identity None: an unlabelled train image
    for split in SPLIT_NAMES:
        d = data_dir / split
        if not d.is_dir():
            raise DataError(f"dataset root {data_dir}: {split} is not a directory")
        for ident in list_dir(d):
            if not ident.is_dir():
                if is_image(ident.name):
                    out.files.append(Path(ident.path))
                    if split == "train":
                        found.append((split, Path(ident.path), None))
                        continue
                    out.problems.append(
                        f"{ident.path}: image outside an identity folder (expected {split}/<identity>/<image>; "
                        "only train/ may hold unlabelled images)"
                    )
                else:
                    out.skipped += 1
                continue
            if ident.name.startswith("."):
                out.skipped += 1
                continue
            for e in list_dir(Path(ident.path)):
                if e.is_dir() or not is_image(e.name):
                    out.skipped += 1
                    continue
                out.files.append(Path(e.path))
                found.append((split, Path(e.path), ident.name))
    mapping = identity_mapping({f[2] for f in found if f[2] is not None})
    for split, path, ident_name in found:
        pid = UNLABELLED if ident_name is None else mapping[ident_name]
        if pid == -1:
            continue
        if pid < -1 and ident_name is not None:
            out.problems.append(f"{path}: identity folder {ident_name!r} is negative (only -1, junk, may be)")
            continue
        try:
            camid = folder_camera(path.name)
        except ValueError as e:
            out.problems.append(f"{path}: unparseable name: {e}")
            continue
        out.splits[split].append(Sample(str(path), pid, camid))
    return out

