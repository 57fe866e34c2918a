"""The dataset manifest passed from prepare-data to every later stage.

File ``<prepare output>/manifest.json`` (format in ``lf2core.stages``)::

    {"version": 1,
     "source": {"name": "dukemtmc", "root": "/data/duke" | "s3://bucket/duke" | "source",
                "train": [["bounding_box_train/0005_c2_f0046985.jpg", 5, 1], ...],
                "query": [...], "gallery": [...]},
     "target": {...}}

Each entry is ``[path relative to root, pid, camid]`` (POSIX separators). ``root`` is an absolute local
path, an s3:// URI (downloaded through ``lf2core.storage.local_path`` when read), or a path relative to
the directory holding manifest.json (used for data generated inside the prepare-data output, so the
output can be moved or copied between pipeline steps).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any

from .. import storage
from ..artifacts import MANIFEST as MANIFEST_NAME
from ..errors import DataError, StorageError
from .datasets import SPLIT_NAMES, Sample, Splits

MANIFEST_VERSION = 1
SIDES = ("source", "target")
SPLIT_KEYS = tuple(f"{side}_{split}" for side in SIDES for split in SPLIT_NAMES)


def _domain(splits: Splits, side: str) -> dict[str, Any]:
    local_root = Path(splits.local_root or splits.root)
    if not splits.root:
        raise DataError(f"manifest: {side} dataset has no root")
    out: dict[str, Any] = {"name": splits.name, "root": splits.root}
    for split in SPLIT_NAMES:
        rows = []
        for s in splits.split(split):
            rel = os.path.relpath(s.path, local_root)
            if rel.startswith("..") or os.path.isabs(rel):
                raise DataError(f"manifest: {side} {split} image {s.path} is not under the root {local_root}")
            rows.append([PurePosixPath(*Path(rel).parts).as_posix(), int(s.pid), int(s.camid)])
        out[split] = rows
    return out


def manifest_dict(source: Splits, target: Splits) -> dict[str, Any]:
    """The JSON-ready manifest of two parsed datasets (paths made relative to each ``local_root``)."""
    return {"version": MANIFEST_VERSION, "source": _domain(source, "source"), "target": _domain(target, "target")}


def write_manifest(out_dir: str | os.PathLike, source: Splits, target: Splits) -> str:
    """Write ``out_dir/manifest.json`` (local or s3://) atomically; returns its location.

    ``Splits.root`` is what is recorded as each root; sample paths are stored relative to
    ``Splits.local_root`` (``root`` when empty), so data staged in a scratch directory can be recorded
    under its final location.
    """
    uri = storage.join(str(out_dir), MANIFEST_NAME)
    data = json.dumps(manifest_dict(source, target), separators=(",", ":")).encode()
    storage.write_bytes(uri, data)
    return uri


def _fail(uri: str, key: str, msg: str) -> DataError:
    return DataError(f"manifest {uri}: key '{key}': {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_domain(uri: str, side: str, d: Any) -> None:
    if not isinstance(d, dict):
        raise _fail(uri, side, f"expected an object, got {type(d).__name__}")
    for key in ("name", "root"):
        if not isinstance(d.get(key), str):
            raise _fail(uri, f"{side}.{key}", "missing or not a string")
    if not d["root"]:
        raise _fail(uri, f"{side}.root", "empty")
    for split in SPLIT_NAMES:
        rows = d.get(split)
        if not isinstance(rows, list):
            raise _fail(uri, f"{side}.{split}", "missing or not a list")
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and _is_int(row[1]) and _is_int(row[2])):
                raise _fail(uri, f"{side}.{split}[{i}]", f"expected [relative_path, pid, camid], got {row!r}")
            rel = row[0]
            if not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts or "\\" in rel:
                raise _fail(uri, f"{side}.{split}[{i}]", f"path {rel!r} must be relative to the root, without '..'")
            if row[2] < 0:
                raise _fail(uri, f"{side}.{split}[{i}]", f"negative camid {row[2]}")


def _manifest_location(uri: str) -> tuple[str, str]:
    """(manifest file URI, the directory URI it lies in) for a prepare output or a manifest.json."""
    uri = str(uri).rstrip("/")
    if uri.endswith(".json"):
        file_uri = uri
        parent = uri.rsplit("/", 1)[0] if storage.is_remote(uri) else str(Path(uri).parent)
    else:
        file_uri, parent = storage.join(uri, MANIFEST_NAME), uri
    return file_uri, parent


def _resolve_root(root: str, manifest_dir: str) -> str:
    if storage.is_remote(root) or os.path.isabs(root):
        return root
    if storage.is_remote(manifest_dir):
        return storage.join(manifest_dir, root)
    return str((Path(manifest_dir) / root).resolve())


def read_manifest(uri: str | os.PathLike) -> dict[str, Splits]:
    """Read a prepare-data output (directory or manifest.json, local or s3://).

    Returns ``{"source": Splits, "target": Splits}`` whose sample paths are absolute local paths (remote
    roots are downloaded through ``storage.local_path``). Raises DataError naming the key at fault.
    """
    file_uri, parent = _manifest_location(str(uri))
    try:
        raw = storage.read_bytes(file_uri)
    except StorageError as e:
        raise DataError(f"manifest {file_uri}: cannot read ({e})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {file_uri}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"manifest {file_uri}: expected a JSON object")
    if data.get("version") != MANIFEST_VERSION:
        raise _fail(file_uri, "version", f"expected {MANIFEST_VERSION}, got {data.get('version')!r}")
    out: dict[str, Splits] = {}
    for side in SIDES:
        if side not in data:
            raise _fail(file_uri, side, "missing")
        d = data[side]
        _check_domain(file_uri, side, d)
        root = _resolve_root(d["root"], parent)
        try:
            local = Path(storage.local_path(root))
        except StorageError as e:
            raise DataError(f"manifest {file_uri}: key '{side}.root': {e}") from None
        if not local.is_dir():
            raise _fail(file_uri, f"{side}.root", f"{root} is not a directory")
        base = str(local)
        lists = {
            split: [Sample(posixpath.join(base, rel) if os.sep == "/" else str(local / rel), pid, cam)
                    for rel, pid, cam in d[split]]
            for split in SPLIT_NAMES
        }
        out[side] = Splits(lists["train"], lists["query"], lists["gallery"], name=d["name"], root=root,
                           local_root=base)
    return out


def split(manifest: dict[str, Splits], name: str) -> list[Sample]:
    """One list of a read manifest by name: ``{source,target}_{train,query,gallery}``."""
    if name not in SPLIT_KEYS:
        raise DataError(f"unknown split '{name}' (valid: {', '.join(SPLIT_KEYS)})")
    side, which = name.split("_", 1)
    if side not in manifest:
        raise DataError(f"split '{name}': the manifest has no {side} dataset")
    return manifest[side].split(which)
