"""The local file system side of ``lf2core.storage``: atomic writes with ordinary permissions."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import StorageError
from .uri import local_of


def exists(uri: str) -> bool:
    return local_of(uri).exists()


def list_files(uri: str) -> list[str]:
    root = local_of(uri)
    if not root.is_dir():
        raise StorageError(f"{uri}: not a directory")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def read_bytes(uri: str) -> bytes:
    p = local_of(uri)
    if not p.exists():
        raise StorageError(f"{uri}: no such file or directory")
    if p.is_dir():
        raise StorageError(f"{uri}: is a directory, expected a file")
    return p.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Temp name + rename: the file appears whole or not at all. A failed write (a full disk, say) removes
    its temp file and the directories it created."""
    p = local_of(uri)
    made = _make_parents(p)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(p.name), suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        shareable(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Copy a file atomically (temp name + rename)."""
    dest = local_of(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(dest.name), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        shareable(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove(uri: str, root: str | None = None) -> None:
    """Delete one file. With ``root`` (a directory above it), the directories between the two that this
    leaves empty are removed too (lf2 made them); ``root`` itself and anything above it are kept."""
    p = local_of(uri)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    if root is None:
        return
    top = local_of(root).resolve()
    for parent in p.parents:
        if parent.resolve() == top or top not in parent.resolve().parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def scratch_prefix(name: str) -> str:
    """The name prefix of this process's scratch files and directories for ``name`` (``.NAME.lf2-PID-``):
    one left behind by a killed process is found again by ``dead_scratch``."""
    return f".{name}.lf2-{os.getpid()}-"


def dead_scratch(folder: Path, name: str, suffix: str) -> list[Path]:
    """The scratch entries for ``name`` in ``folder`` (``scratch_prefix`` + random + ``suffix``) whose
    process is gone: left by a killed lf2 process, safe to delete. Entries of live processes are kept."""
    found = []
    for p in folder.glob(f".{name}.lf2-*-*{suffix}"):
        pid = p.name[len(name) + 6:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            found.append(p)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shareable(path: str | os.PathLike) -> None:
    """Give a temp file/directory (created 0600/0700) the permissions of an ordinary one under the
    process umask (0644/0755 by default), so that outputs on a shared file system are readable by the
    group/others as the site's umask intends (docs/reliability.md)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _make_parents(p: Path) -> list[Path]:
    """Create the missing parent directories of ``p``; returns them, deepest first."""
    missing = [d for d in [p.parent, *p.parent.parents] if not d.exists()]
    p.parent.mkdir(parents=True, exist_ok=True)
    return missing
