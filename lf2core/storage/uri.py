"""Locations: a local path (``file://`` allowed) or an ``s3://bucket/key`` URI."""

from __future__ import annotations

from pathlib import Path

from ..errors import StorageError


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_of(uri: str) -> Path:
    """The local path of a non-remote location (``file://`` stripped)."""
    uri = str(uri)
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def join(uri: str, *parts: str) -> str:
    """Join path components for a local path or a URI."""
    uri = str(uri)
    if is_remote(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out += "/" + p
        return out
    return str(Path(local_of(uri), *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ``StorageError`` for a malformed URI."""
    if not is_remote(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: missing bucket name")
    return bucket, key
