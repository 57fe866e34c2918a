"""Person re-id dataset formats: parse a dataset root into train / query / gallery lists of samples.

Formats (``load(name, root)``; the layouts are documented for users in ``docs/data.md``):

- ``market1501``: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` holding images named
  ``0002_c1s1_000451_00.jpg`` (pid, camera, sequence, frame, box).
- ``dukemtmc``: the same folders, images named ``0005_c2_f0046985.jpg`` (pid, camera, frame).
- ``msmt17``: MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) and ``list_{train,val,query,gallery}.txt`` (lines
  ``relative/path.jpg label``); train = list_train + list_val; the camera is the file name's 3rd field.
- ``folder``: a generic layout, ``root/{train,query,gallery}/<identity>/<image>`` with the camera taken from
  a ``c<digits>`` token of the file name (camera 0 when there is none), or a CSV ``root/manifest.csv`` with
  columns ``split,path,pid,camid``. Train images without an identity (an image directly in ``train/``, a
  ``train`` CSV row with an empty pid) are unlabelled: pid ``UNLABELLED`` (an unlabelled target domain).

Conventions shared by every format: pid -1 (junk) is dropped; pid 0 (Market/Duke distractors) is kept;
pid ``UNLABELLED`` (-2) marks a train image without an identity (``folder`` format only);
camids are 0-based (``c1`` -> 0); sample paths are absolute local paths; lists are sorted by file name
(folder formats) or kept in list-file order (MSMT17, CSV). Parsing lists directories and file names but
never opens an image; ``check_main`` (``lf2 data check``) does.

A root given as ``s3://bucket/prefix`` is first made local with ``lf2core.storage.local_path``. A root
holding exactly one sub-folder with the expected layout (what unzipping an archive usually gives, e.g.
``market/Market-1501-v15.09.15/``) is accepted too.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from .. import storage
from ..errors import DataError

FORMATS = ("market1501", "dukemtmc", "msmt17", "folder")
SPLIT_NAMES = ("train", "query", "gallery")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MSMT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)}
# image folders (train, test): V1, then V2 as distributed (both spellings of its suffix are seen)
MSMT_IMAGE_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"), ("mask_train_V2", "mask_test_V2"))
FOLDER_CSV = "manifest.csv"
FOLDER_CSV_COLUMNS = ("split", "path", "pid", "camid")
#: pid of a train image without an identity (unlabelled target data; -1 is junk and never kept)
UNLABELLED = -2

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)$")
_DUKE_RE = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)$")
# folder format: a "c" starting the name or following a non-alphanumeric character, then digits
_CAMERA_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])c(\d+)")
# archive debris that never counts as the "single sub-folder" of a root
_IGNORED_DIRS = frozenset({"__MACOSX"})


class Sample(NamedTuple):
    """One image: absolute local ``path``, identity ``pid`` (as in the dataset, ``UNLABELLED`` when the
    image has none) and 0-based ``camid``."""

    path: str
    pid: int
    camid: int


@dataclass
class Splits:
    """A parsed dataset: three lists of ``Sample``.

    ``root`` is the root as given (a local path made absolute, or an s3:// URI); ``local_root`` is the
    local directory that ``root`` stands for (the download cache for s3://). Every sample path lies under
    ``local_root``, which is what the manifest stores paths relative to.
    """

    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    name: str = ""
    root: str = ""
    local_root: str = ""

    def __repr__(self) -> str:
        n = ", ".join(f"{s}={len(self.split(s))}" for s in SPLIT_NAMES)
        return f"Splits(name={self.name!r}, root={self.root!r}, {n})"

    def split(self, which: str) -> list[Sample]:
        if which not in SPLIT_NAMES:
            raise DataError(f"unknown split '{which}' (valid: {', '.join(SPLIT_NAMES)})")
        return getattr(self, which)

    def stats(self) -> dict[str, dict[str, int]]:
        """``{"train": {"identities", "images", "cameras"[, "unlabelled"]}, "query": ..., "gallery": ...}``."""
        return {s: split_stats(self.split(s)) for s in SPLIT_NAMES}


def split_stats(samples: list[Sample]) -> dict[str, int]:
    """Distinct identities, images and distinct cameras of one list of samples.

    Unlabelled images (pid ``UNLABELLED``) count as images but not as an identity; when there are any,
    their number is added as ``"unlabelled"`` (the key is absent otherwise).
    """
    out = {
        "identities": len({s.pid for s in samples if s.pid != UNLABELLED}),
        "images": len(samples),
        "cameras": len({s.camid for s in samples}),
    }
    unlabelled = count_unlabelled(samples)
    if unlabelled:
        out["unlabelled"] = unlabelled
    return out


def count_unlabelled(samples: list[Sample]) -> int:
    """How many of ``samples`` have no identity (pid ``UNLABELLED``)."""
    return sum(s.pid == UNLABELLED for s in samples)


def relabel(samples: list[Sample]) -> np.ndarray:
    """Training labels 0..n-1 for the samples' pids (in increasing pid order); int64 array [N].

    ``Sample.pid`` is left untouched; use this where a classifier needs contiguous labels.
    """
    pids = np.fromiter((s.pid for s in samples), dtype=np.int64, count=len(samples))
    if len(pids) and pids.min() < 0:
        bad = samples[int(np.argmin(pids))]
        if bad.pid == UNLABELLED:
            raise DataError(f"{bad.path}: unlabelled image (pid {UNLABELLED}, no identity) cannot be used as a "
                            "training label")
        raise DataError(f"{bad.path}: negative pid {bad.pid} cannot be used as a training label")
    _, labels = np.unique(pids, return_inverse=True)
    return labels.astype(np.int64).reshape(-1)


# ----------------------------------------------------------------------------------------- parsing
@dataclass
class _Parsed:
    """What a format parser found: the splits, every image file it considered (for ``check``), the
    problems (one line each, naming the file) and how many non-image files it skipped."""

    splits: dict[str, list[Sample]]
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    data_dir: Path = Path(".")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{path}: cannot list directory ({e.strerror or e})") from None


def _find_layout(root: Path, required: tuple[str, ...], fmt: str) -> Path:
    """``root`` itself if it holds every entry of ``required``, else its single sub-folder that does."""
    if all((root / r).exists() for r in required):
        return root
    candidates = [
        Path(e.path)
        for e in _list_dir(root)
        if e.is_dir() and not e.name.startswith(".") and e.name not in _IGNORED_DIRS
        and all((Path(e.path) / r).exists() for r in required)
    ]
    if len(candidates) == 1:
        return candidates[0]
    missing = [r for r in required if not (root / r).exists()]
    if len(candidates) > 1:
        raise DataError(
            f"dataset root {root}: several sub-folders hold a {fmt} layout "
            f"({', '.join(c.name for c in candidates)}); pass one of them as the root"
        )
    raise DataError(f"dataset root {root}: not a {fmt} layout, missing {', '.join(missing)}")


def _camera_from_number(num: str, path: Path, problems: list[str]) -> Optional[int]:
    c = int(num)
    if c < 1:
        problems.append(f"{path}: unparseable name: camera number {c} (cameras are numbered from 1)")
        return None
    return c - 1


def _parse_market_style(root: Path, fmt: str) -> _Parsed:
    pattern = _MARKET_RE if fmt == "market1501" else _DUKE_RE
    example = "0002_c1s1_000451_00.jpg" if fmt == "market1501" else "0005_c2_f0046985.jpg"
    data_dir = _find_layout(root, tuple(MARKET_FOLDERS.values()), fmt)
    out = _Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    for split, folder in MARKET_FOLDERS.items():
        d = data_dir / folder
        if not d.is_dir():
            raise DataError(f"dataset root {data_dir}: {folder} is not a directory")
        for e in _list_dir(d):
            if e.is_dir() or not _is_image(e.name):
                out.skipped += 1
                continue
            path = Path(e.path)
            out.files.append(path)
            m = pattern.match(os.path.splitext(e.name)[0])
            if not m:
                out.problems.append(f"{path}: unparseable name for {fmt} (expected e.g. {example})")
                continue
            pid = int(m.group(1))
            camid = _camera_from_number(m.group(2), path, out.problems)
            if camid is None or pid == -1:
                continue
            if pid < -1:
                out.problems.append(f"{path}: unparseable name: pid {pid} (only -1 may be negative)")
                continue
            out.splits[split].append(Sample(str(path), pid, camid))
    return out


def _find_msmt_layout(root: Path) -> tuple[Path, str, str]:
    """(data dir, train image folder, test image folder) of an MSMT17 V1 or V2 root."""
    lists = tuple(n for names in MSMT_LISTS.values() for n in names)
    errors = []
    for train_dir, test_dir in MSMT_IMAGE_DIRS:
        try:
            return _find_layout(root, (train_dir, test_dir, *lists), "msmt17"), train_dir, test_dir
        except DataError as e:
            errors.append(e)
    # report against the version whose image folders are there (V1 when neither is)
    names = {e.name for e in _list_dir(root)}
    pick = next((k for k, (tr, _) in enumerate(MSMT_IMAGE_DIRS) if tr in names), 0)
    raise errors[pick]


def _parse_msmt(root: Path) -> _Parsed:
    data_dir, train_dir, test_dir = _find_msmt_layout(root)
    out = _Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    for split, list_names in MSMT_LISTS.items():
        img_dir = data_dir / (train_dir if split == "train" else test_dir)
        for list_name in list_names:
            list_path = data_dir / list_name
            try:
                lines = list_path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{list_path}: cannot read list file ({e})") from None
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{list_path}:{lineno}"
                fields = line.split()
                if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
                    out.problems.append(f"{where}: expected 'relative/path.jpg label', got {line.strip()!r}")
                    continue
                rel, pid = fields[0], int(fields[1])
                path = img_dir / rel
                out.files.append(path)
                parts = os.path.splitext(os.path.basename(rel))[0].split("_")
                if len(parts) < 3 or not parts[2].isdigit():
                    out.problems.append(
                        f"{path} ({where}): unparseable name for msmt17 "
                        "(expected e.g. 0000_000_01_0303morning_0015_0.jpg, camera in the 3rd field)"
                    )
                    continue
                camid = _camera_from_number(parts[2], path, out.problems)
                if camid is None:
                    continue
                if not path.is_file():
                    out.problems.append(f"{path} ({where}): listed but missing")
                    continue
                if pid == -1:
                    continue
                if pid < -1:
                    out.problems.append(f"{where}: negative label {pid}")
                    continue
                out.splits[split].append(Sample(str(path), pid, camid))
    return out


def _identity_mapping(names: set[str]) -> dict[str, int]:
    """Identity names -> pids: the integer itself when every name is an integer, else 0..n-1 in sorted order."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def folder_camera(filename: str) -> int:
    """Camera of a ``folder``-format image: ``c<N>`` token -> N-1, no token -> 0, ``c0`` -> ValueError."""
    m = _CAMERA_TOKEN_RE.search(os.path.splitext(os.path.basename(filename))[0])
    if not m:
        return 0
    c = int(m.group(1))
    if c < 1:
        raise ValueError(f"camera token c{m.group(1)}: cameras are numbered from 1")
    return c - 1


def _parse_folder_csv(data_dir: Path, csv_path: Path) -> _Parsed:
    out = _Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
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
    mapping = _identity_mapping({r[2] for r in rows if r[2]})
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


def _parse_folder(root: Path) -> _Parsed:
    if (root / FOLDER_CSV).is_file():
        return _parse_folder_csv(root, root / FOLDER_CSV)
    try:
        data_dir = _find_layout(root, SPLIT_NAMES, "folder")
    except DataError:
        # a single sub-folder holding manifest.csv is accepted as well
        subs = [
            Path(e.path) for e in _list_dir(root)
            if e.is_dir() and not e.name.startswith(".") and e.name not in _IGNORED_DIRS
            and (Path(e.path) / FOLDER_CSV).is_file()
        ]
        if len(subs) == 1:
            return _parse_folder_csv(subs[0], subs[0] / FOLDER_CSV)
        raise DataError(
            f"dataset root {root}: not a folder layout, need {FOLDER_CSV} or the folders "
            f"{', '.join(s for s in SPLIT_NAMES if not (root / s).is_dir())}"
        ) from None
    out = _Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
    found: list[tuple[str, Path, Optional[str]]] = []  # identity None: an unlabelled train image
    for split in SPLIT_NAMES:
        d = data_dir / split
        if not d.is_dir():
            raise DataError(f"dataset root {data_dir}: {split} is not a directory")
        for ident in _list_dir(d):
            if not ident.is_dir():
                if _is_image(ident.name):
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
            for e in _list_dir(Path(ident.path)):
                if e.is_dir() or not _is_image(e.name):
                    out.skipped += 1
                    continue
                out.files.append(Path(e.path))
                found.append((split, Path(e.path), ident.name))
    mapping = _identity_mapping({f[2] for f in found if f[2] is not None})
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


_PARSERS: dict[str, Callable[[Path], _Parsed]] = {
    "market1501": lambda r: _parse_market_style(r, "market1501"),
    "dukemtmc": lambda r: _parse_market_style(r, "dukemtmc"),
    "msmt17": _parse_msmt,
    "folder": _parse_folder,
}


def _localise(root: str) -> tuple[str, Path]:
    """(root as recorded, local directory): s3:// through ``storage.local_path``, local made absolute."""
    root = str(root)
    if not root:
        raise DataError("dataset root is empty")
    if storage.is_remote(root):
        local = Path(storage.local_path(root))
        return root.rstrip("/"), local
    if root.startswith("file://"):
        root = root[len("file://"):]
    local = Path(root).expanduser().resolve()
    if not local.exists():
        raise DataError(f"dataset root {root}: no such directory")
    if not local.is_dir():
        raise DataError(f"dataset root {root}: not a directory")
    return str(local), local


def _parse(name: str, local: Path) -> _Parsed:
    if name not in _PARSERS:
        raise DataError(f"unknown dataset format '{name}' (valid: {', '.join(FORMATS)})")
    return _PARSERS[name](local)


def load(name: str, root: str | os.PathLike) -> Splits:
    """Parse dataset ``root`` (local path or s3:// URI) in format ``name`` without opening any image.

    Raises DataError naming the folder when the layout is wrong and naming the first file whose name (or
    list line) does not parse. Returns ``Splits`` with absolute local sample paths.
    """
    recorded, local = _localise(str(root))
    parsed = _parse(name, local)
    if parsed.problems:
        more = f" (and {len(parsed.problems) - 1} more problems; run `lf2 data check {root}`)" if len(parsed.problems) > 1 else ""
        raise DataError(parsed.problems[0] + more)
    return Splits(
        train=parsed.splits["train"], query=parsed.splits["query"], gallery=parsed.splits["gallery"],
        name=name, root=recorded, local_root=str(local),
    )


def detect_format(root: str | os.PathLike) -> str:
    """Guess the format of a local dataset root (or its single sub-folder) from its layout and names."""
    local = Path(root)
    if not local.is_dir():
        raise DataError(f"dataset root {root}: no such directory")
    for fmt, required in (
        *(("msmt17", (tr, te, "list_train.txt")) for tr, te in MSMT_IMAGE_DIRS),
        ("market-style", tuple(MARKET_FOLDERS.values())),
        ("folder", (FOLDER_CSV,)),
        ("folder", SPLIT_NAMES),
    ):
        try:
            data_dir = _find_layout(local, required, fmt)
        except DataError:
            continue
        if fmt != "market-style":
            return fmt
        votes = {"market1501": 0, "dukemtmc": 0}
        for folder in ("query", "bounding_box_test", "bounding_box_train"):
            for e in _list_dir(data_dir / folder)[:2000]:
                stem = os.path.splitext(e.name)[0]
                votes["market1501"] += bool(_MARKET_RE.match(stem))
                votes["dukemtmc"] += bool(_DUKE_RE.match(stem))
        return "dukemtmc" if votes["dukemtmc"] > votes["market1501"] else "market1501"
    raise DataError(
        f"dataset root {root}: cannot detect the format (no bounding_box_train/query/bounding_box_test, "
        f"train/test/list_train.txt, {FOLDER_CSV} or train/query/gallery); pass --format"
    )


# ----------------------------------------------------------------------------------------- checking
def check_image(path: str | os.PathLike) -> Optional[str]:
    """None if ``path`` opens, verifies and fully decodes with PIL, else the reason it does not."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"{type(e).__name__}: {e}"
    return None


def format_stats_table(stats: dict[str, dict[str, int]]) -> str:
    """The per-split statistics as a small fixed-width table (an ``unlabelled`` column when any split has
    unlabelled images; they count as images, not as identities)."""
    extra = any(stats[s].get("unlabelled", 0) for s in SPLIT_NAMES)
    head = f"{'split':<8} {'identities':>10} {'images':>8} {'cameras':>8}"
    lines = [head + (f" {'unlabelled':>10}" if extra else "")]
    for s in SPLIT_NAMES:
        st = stats[s]
        lines.append(f"{s:<8} {st['identities']:>10} {st['images']:>8} {st['cameras']:>8}"
                     + (f" {st.get('unlabelled', 0):>10}" if extra else ""))
    return "\n".join(lines)


def check_main(root: str, fmt: Optional[str] = None, open_images: bool = True, workers: int = 0) -> int:
    """``lf2 data check``: print split statistics and one line per problem; 1 if any problem, else 0.

    Every image file is scanned (name parsing and, with ``open_images``, PIL verify + full decode); the
    check never stops at the first problem. A wrong layout still raises DataError (the CLI exits 2).
    """
    recorded, local = _localise(root)
    if fmt is None:
        fmt = detect_format(local)
        print(f"format: {fmt} (detected)")
    else:
        print(f"format: {fmt}")
    parsed = _parse(fmt, local)
    print(f"root: {recorded}" + (f" (data in {parsed.data_dir})" if parsed.data_dir != local else ""))
    stats = {s: split_stats(parsed.splits[s]) for s in SPLIT_NAMES}
    print(format_stats_table(stats))
    if parsed.skipped:
        print(f"skipped {parsed.skipped} non-image entries")
    problems = list(parsed.problems)
    if open_images:
        files = [f for f in dict.fromkeys(parsed.files) if f.is_file()]
        from tqdm import tqdm

        n_workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(
                tqdm(pool.map(check_image, files, chunksize=64), total=len(files), desc="checking images",
                     unit="img", file=sys.stderr, disable=len(files) < 500)
            )
        bad = [(f, r) for f, r in zip(files, results) if r is not None]
        problems += [f"{f}: unreadable image ({r})" for f, r in bad]
        print(f"opened {len(files)} images, {len(bad)} unreadable")
    for p in problems:
        print(f"PROBLEM {p}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("ok")
    return 0
