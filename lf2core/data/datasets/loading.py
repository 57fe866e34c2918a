"""``load(name, root)``: localise a root, pick the format's parser, and ``detect_format``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ... import storage
from ...errors import DataError
from .folder import FOLDER_CSV, parse_folder
from .layout import Parsed, find_layout
from .market import MARKET_FOLDERS, market_or_duke, parse_market_style
from .msmt import MSMT_IMAGE_DIRS, parse_msmt
from .samples import FORMATS, SPLIT_NAMES, Splits

_PARSERS: dict[str, Callable[[Path], Parsed]] = {
    "market1501": lambda r: parse_market_style(r, "market1501"),
    "dukemtmc": lambda r: parse_market_style(r, "dukemtmc"),
    "msmt17": parse_msmt,
    "folder": parse_folder,
}


def localise(root: str) -> tuple[str, Path]:
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


def parse(name: str, local: Path) -> Parsed:
    if name not in _PARSERS:
        raise DataError(f"unknown dataset format '{name}' (valid: {', '.join(FORMATS)})")
    return _PARSERS[name](local)


def load(name: str, root: str | os.PathLike) -> Splits:
    """Parse dataset ``root`` (local path or s3:// URI) in format ``name`` without opening any image.

    Raises DataError naming the folder when the layout is wrong and naming the first file whose name (or
    list line) does not parse. Returns ``Splits`` with absolute local sample paths.
    """
    recorded, local = localise(str(root))
    parsed = parse(name, local)
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
            data_dir = find_layout(local, required, fmt)
        except DataError:
            continue
        if fmt != "market-style":
            return fmt
        return market_or_duke(data_dir)
    raise DataError(
        f"dataset root {root}: cannot detect the format (no bounding_box_train/query/bounding_box_test, "
        f"train/test/list_train.txt, {FOLDER_CSV} or train/query/gallery); pass --format"
    )

