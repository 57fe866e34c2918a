"""MSMT17 (V1 and V2): image folders plus list files of ``relative/path.jpg label`` lines."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import DataError
from .layout import Parsed, camera_from_number, find_layout, list_dir
from .samples import SPLIT_NAMES

MSMT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)}
# image folders (train, test): V1, then V2 as distributed (both spellings of its suffix are seen)
MSMT_IMAGE_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"), ("mask_train_V2", "mask_test_V2"))


def find_msmt_layout(root: Path) -> tuple[Path, str, str]:
    """(data dir, train image folder, test image folder) of an MSMT17 V1 or V2 root."""
    lists = tuple(n for names in MSMT_LISTS.values() for n in names)
    errors = []
    for train_dir, test_dir in MSMT_IMAGE_DIRS:
        try:
            return find_layout(root, (train_dir, test_dir, *lists), "msmt17"), train_dir, test_dir
        except DataError as e:
            errors.append(e)
    # report against the version whose image folders are there (V1 when neither is)
    names = {e.name for e in list_dir(root)}
    pick = next((k for k, (tr, _) in enumerate(MSMT_IMAGE_DIRS) if tr in names), 0)
    raise errors[pick]


def parse_msmt(root: Path) -> Parsed:
    data_dir, train_dir, test_dir = find_msmt_layout(root)
    out = Parsed(splits={s: [] for s in SPLIT_NAMES}, data_dir=data_dir)
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
                camid = camera_from_number(parts[2], path, out.problems)
                if camid is None:
                    continue
                if not path.is_file():
                    out.problems.append(f"{path} ({where}): listed but missing")
                    continue
                out.add(split, path, pid, camid, lambda: f"{where}: negative label {pid}")
    return out

