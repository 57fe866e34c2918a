"""Where stage inputs come from and outputs go: local paths (the embedded default) and s3:// URIs.

Every stage goes through these few functions, so a stage never knows which backend it talks to:

- ``local_path(uri)``: a local ``Path`` for an input file or directory (s3:// is downloaded into a cache).
- ``output_dir(uri)``: context manager giving a local scratch directory; on success its contents are
  committed to ``uri`` atomically (local: rename; s3: every object uploaded, then a ``_COMPLETE`` marker
  last), on failure nothing is left at ``uri``.
- ``read_bytes / write_bytes / exists / join``: single objects; writes are atomic.

NOTE: this first version implements local paths only; s3:// support (boto3) is added behind the same
functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import StorageError

COMPLETE_MARKER = "_COMPLETE"


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path components for a local path or a URI."""
    uri = str(uri)
    if is_remote(uri):
        out = uri.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(uri, *parts))


def _require_local(uri: str) -> Path:
    if is_remote(uri):
        raise StorageError(f"{uri}: s3:// storage is not available in this build")
    return Path(uri)


def exists(uri: str) -> bool:
    return _require_local(uri).exists()


def local_path(uri: str) -> Path:
    """A local path holding the file or directory ``uri`` (downloaded first when remote)."""
    p = _require_local(uri)
    if not p.exists():
        raise StorageError(f"{uri}: no such file or directory")
    return p


def read_bytes(uri: str) -> bytes:
    p = local_path(uri)
    if p.is_dir():
        raise StorageError(f"{uri}: is a directory, expected a file")
    return p.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temp name in the same directory, then rename)."""
    p = _require_local(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def output_dir(uri: str) -> Iterator[Path]:
    """Yield a scratch directory; commit it to ``uri`` only if the block succeeds.

    A previous output at ``uri`` is replaced as a whole. A ``_COMPLETE`` marker is written last, so a
    reader (or KFP's cache) never mistakes a half-written output for a finished one.
    """
    dest = _require_local(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(uri: str) -> bool:
    """True if ``uri`` is an output directory committed by ``output_dir``."""
    return exists(join(uri, COMPLETE_MARKER))
