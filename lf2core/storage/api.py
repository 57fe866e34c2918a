"""The backend-neutral file API: each function takes a local path or an s3:// URI and dispatches."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError, StorageError
from . import local, s3
from .uri import is_remote, local_of


def exists(uri: str) -> bool:
    """True if ``uri`` is an existing file/object or a non-empty directory/prefix."""
    return s3.exists(str(uri)) if is_remote(uri) else local.exists(str(uri))


def list_files(uri: str) -> list[str]:
    """Relative paths of all files below a directory or prefix (sorted)."""
    return s3.list_files(str(uri)) if is_remote(uri) else local.list_files(str(uri))


def local_path(uri: str) -> Path:
    """A local path holding the file or directory ``uri`` (downloaded to the cache first when remote:
    ``lf2core.storage.s3.download``)."""
    uri = str(uri)
    if is_remote(uri):
        return s3.download(uri)
    p = local_of(uri)
    if not p.exists():
        raise StorageError(f"{uri}: no such file or directory")
    return p


def version(uri: str) -> Optional[str]:
    """What changes whenever the file/object ``uri`` is rewritten: size and modification time (local) or
    size and ETag (s3); None when it does not exist."""
    uri = str(uri)
    if is_remote(uri):
        obj = s3.head(uri)
        return None if obj is None else f"{obj.get('ContentLength')}:{obj.get('ETag')}"
    try:
        st = os.stat(local_of(uri))
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_bytes(uri: str) -> bytes:
    return s3.read_bytes(str(uri)) if is_remote(uri) else local.read_bytes(str(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (local: temp name + rename; s3: a single PUT)."""
    (s3.write_bytes if is_remote(uri) else local.write_bytes)(str(uri), data)


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Copy one local file to ``uri`` (s3: multipart above ``s3.MULTIPART_THRESHOLD``; local: atomic copy)."""
    (s3.upload_file if is_remote(uri) else local.upload_file)(path, str(uri))


def remove(uri: str, root: Optional[str] = None) -> None:
    """Delete one file/object; with ``root``, the local directories below ``root`` that this leaves empty
    are removed too (lf2 made them)."""
    if is_remote(uri):
        s3.remove(str(uri))
    else:
        local.remove(str(uri), root)


def read_npz(uri: str, what: str = "arrays") -> tuple[dict[str, Any], bytes]:
    """Read an ``.npz`` file (local or s3://) -> ({name: np.ndarray}, raw bytes); no pickles.

    ``what`` names the content in the error (``DataError`` naming the URI) when it is missing or malformed.
    """
    import numpy as np

    try:
        raw = read_bytes(uri)
    except Exception as e:
        raise DataError(f"{uri}: cannot read {what} ({e})") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{uri}: not a valid .npz file ({e})") from None
    return arrays, raw
