"""What the format parsers share: the parse result, directory listing and layout discovery."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ...errors import DataError
from .samples import IMAGE_EXTENSIONS, Sample

# archive debris that never counts as the "single sub-folder" of a root
IGNORED_DIRS = frozenset({"__MACOSX"})


@dataclass
class Parsed:
    """What a format parser found: the splits, every image file it considered (for ``check``), the
    problems (one line each, naming the file) and how many non-image files it skipped."""

    splits: dict[str, list[Sample]]
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    data_dir: Path = Path(".")

    def add(self, split: str, path: Path, pid: int, camid: int, negative: Callable[[], str]) -> None:
        """Keep ``Sample(path, pid, camid)`` in ``split``: junk (pid -1) is dropped, and a pid below -1 is
        not kept but recorded as the problem ``negative()``."""
        if pid == -1:
            return
        if pid < -1:
            self.problems.append(negative())
            return
        self.splits[split].append(Sample(str(path), pid, camid))


def is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{path}: cannot list directory ({e.strerror or e})") from None


def find_layout(root: Path, required: tuple[str, ...], fmt: str) -> Path:
    """``root`` itself if it holds every entry of ``required``, else its single sub-folder that does."""
    if all((root / r).exists() for r in required):
        return root
    candidates = [
        Path(e.path)
        for e in list_dir(root)
        if e.is_dir() and not e.name.startswith(".") and e.name not in IGNORED_DIRS
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


def camera_from_number(num: str, path: Path, problems: list[str]) -> Optional[int]:
    c = int(num)
    if c < 1:
        problems.append(f"{path}: unparseable name: camera number {c} (cameras are numbered from 1)")
        return None
    return c - 1

