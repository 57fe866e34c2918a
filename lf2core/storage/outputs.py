"""Stage outputs: ``output_dir`` commits a scratch directory to a location, and never deletes what lf2
did not write there.

An output directory/prefix holds, beside the stage's files, two control files: ``_LF2_OUTPUT.json``
(which stage wrote it and the list of files it wrote: lf2 only ever replaces or deletes files named
there) and ``_COMPLETE`` (written last; absent while an output is being replaced). The rules, with the
tests that prove them: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..errors import StorageError
from . import local, s3
from .api import exists, list_files, local_path, read_bytes, remove, upload_file, write_bytes
from .uri import is_remote, join, local_of, split_s3

COMPLETE_MARKER = "_COMPLETE"
OWNER_FILE = "_LF2_OUTPUT.json"
OWNER_FORMAT = "lf2-output/1"
CONTROL_FILES = (COMPLETE_MARKER, OWNER_FILE)
_overwrite_default = False


def set_overwrite(allowed: bool) -> None:
    """Whether ``output_dir`` may write into a location holding files that lf2 did not write there (the
    CLI's ``--overwrite``). Even then lf2 only replaces files of the names it writes; it deletes none."""
    global _overwrite_default
    _overwrite_default = bool(allowed)


def overwrite_allowed() -> bool:
    return _overwrite_default


def _read_owner(uri: str) -> Optional[dict]:
    """The ownership record of an output location, or None (absent, unreadable or not lf2's)."""
    try:
        rec = json.loads(read_bytes(join(uri, OWNER_FILE)))
    except (StorageError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != OWNER_FORMAT or not isinstance(rec.get("files"), list):
        return None
    return rec


def present_files(uri: str) -> Optional[list[str]]:
    """Relative paths of the files at an output location; None when nothing is there. Raises
    ``StorageError`` when the location is a file or an object, or (S3) a whole bucket."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        if not key.strip("/"):
            raise StorageError(f"{uri}: a bucket root is never an output location; give a prefix, "
                               f"e.g. s3://{bucket}/lf2/run1")
        s3.check_bucket_or_raise(uri)
        if s3.head(uri) is not None:
            raise StorageError(f"{uri}: is an existing object, not an output prefix; lf2 will not replace it")
        return list_files(uri) or None
    p = local_of(uri)
    if p.is_symlink() and not p.exists():
        raise StorageError(f"{uri}: is a broken symbolic link")
    if not p.exists():
        return None
    if not p.is_dir():
        raise StorageError(f"{uri}: is an existing file, not a directory; lf2 will not replace it")
    if not any(p.iterdir()):
        return None
    return list_files(uri)


def claim_output(uri: str, owner: str, overwrite: Optional[bool] = None) -> set[str]:
    """Check that stage ``owner`` may write its output at ``uri``, and mark a previous output of the same
    stage as being replaced (its ``_COMPLETE`` is removed, so a killed or failed rerun never leaves an
    output that looks complete). Returns the files of that previous output, which lf2 may replace.

    Allowed: a location that does not exist or is empty, or that holds exactly a previous output of the
    same stage. Anything else - files lf2 did not write, another stage's output, an existing file or
    object, an s3:// bucket root - raises ``StorageError`` naming the location. ``overwrite`` (default:
    ``set_overwrite``) lets lf2 write beside foreign files, never over a file/object nor at a bucket root.
    """
    uri = str(uri)
    overwrite = _overwrite_default if overwrite is None else overwrite
    present = present_files(uri)
    if present is None:
        return set()
    rec = _read_owner(uri)
    same_stage = rec is not None and rec.get("stage") == owner
    owned = set(rec["files"]) if same_stage else set()
    if not overwrite:
        if rec is not None and not same_stage:
            raise StorageError(f"{uri}: holds the output of lf2 stage '{rec.get('stage')}', not '{owner}'; "
                               f"use another location (or --overwrite to write beside it)")
        foreign = sorted(f for f in present if f not in owned and f not in CONTROL_FILES)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise StorageError(f"{uri}: is not empty and holds files lf2 did not write there ({foreign[0]}{more}); "
                               f"use an empty or new location (or --overwrite: lf2 deletes none of them)")
    if COMPLETE_MARKER in present:
        remove(join(uri, COMPLETE_MARKER))
    return owned


@contextlib.contextmanager
def output_dir(uri: str, owner: str, overwrite: Optional[bool] = None) -> Iterator[Path]:
    """Yield a scratch directory; commit it to ``uri`` as stage ``owner``'s output only if the block succeeds.

    On entry the location is claimed (``claim_output``: refused unless empty, new, or a previous output of
    the same stage). On success a new local directory appears whole by one rename; otherwise every file
    is moved (local) or uploaded (s3, multipart for big ones) into place, the files of the previous output
    that the new one lacks are deleted - only those, as listed in its ``_LF2_OUTPUT.json`` - and the new
    ownership record and ``_COMPLETE`` are written last: a reader (or KFP's cache) that checks
    ``is_complete`` never takes a partial output. On failure nothing new is committed and the scratch
    directory is removed (one left by a killed process is removed by the next ``output_dir`` there).
    """
    uri = str(uri)
    claim_output(uri, owner, overwrite)
    if is_remote(uri):
        tmp = Path(tempfile.mkdtemp(prefix="lf2-out-"))
    else:
        dest = local_of(uri)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_scratch(dest)
            tmp = Path(tempfile.mkdtemp(prefix=local.scratch_prefix(dest.name), suffix=".partial",
                                        dir=dest.parent))
            local.shareable(tmp)
        except OSError as e:
            raise StorageError(f"{uri}: cannot create the output directory there ({e.strerror or e})") from None
    try:
        yield tmp
        _commit(tmp, uri, owner)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_scratch(dest: Path) -> None:
    """Remove scratch directories of this output left by killed lf2 processes (``.NAME.lf2-PID-*.partial``)."""
    for p in local.dead_scratch(dest.parent, dest.name, ".partial"):
        shutil.rmtree(p, ignore_errors=True)


def _commit(tmp: Path, uri: str, owner: str) -> None:
    for name in CONTROL_FILES:  # only the top level's control files are lf2's own here
        with contextlib.suppress(FileNotFoundError):
            (tmp / name).unlink()
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    record = (json.dumps({"format": OWNER_FORMAT, "stage": owner, "files": files}, indent=1) + "\n").encode()
    is_local = not is_remote(uri)
    if is_local and not local_of(uri).exists():
        (tmp / OWNER_FILE).write_bytes(record)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        os.replace(tmp, local_of(uri))
        return
    owned = claim_output(uri, owner, overwrite=True)  # re-read: the location may have changed since entry
    if is_local:
        for f in files:
            target = local_of(uri) / f
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / f, target)
            except OSError as e:
                raise StorageError(f"{target}: cannot be written ({e.strerror or e})") from None
    else:
        bucket, key = split_s3(uri)
        s3.parallel(lambda f: upload_file(tmp / f, f"s3://{bucket}/{key.rstrip('/')}/{f}"), files)
    for f in sorted(owned - set(files)):
        remove(join(uri, f), root=uri)
    write_bytes(join(uri, OWNER_FILE), record)
    write_bytes(join(uri, COMPLETE_MARKER), b"ok\n")


def remove_files(uri: str, names: list[str]) -> None:
    """Delete the named files, written by lf2, under a lf2-made local directory or s3:// prefix, with the
    scratch copies of them that killed lf2 processes left (``local.dead_scratch``); the local directory,
    and those below it, are removed when this leaves them empty. Nothing else there is touched."""
    uri = str(uri)
    for name in names:
        remove(join(uri, name), root=uri)
    if is_remote(uri):
        return
    root = local_of(uri)
    for name in names:
        folder = (root / name).parent
        for p in local.dead_scratch(folder, Path(name).name, ".tmp") if folder.is_dir() else []:
            remove(str(p), root=uri)
    with contextlib.suppress(OSError):
        root.rmdir()


def is_complete(uri: str) -> bool:
    """True if ``uri`` is an output directory committed by ``output_dir``."""
    return exists(join(uri, COMPLETE_MARKER))


def copy_tree(src: str, dest: str, owner: str) -> None:
    """Copy a local or s3:// directory to ``dest`` as ``owner``'s output (``output_dir``: atomic commit)."""
    root = local_path(src)
    with output_dir(dest, owner) as out:
        if root.is_dir():
            shutil.copytree(root, out, dirs_exist_ok=True)
        else:
            shutil.copy2(root, out / root.name)
