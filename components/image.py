"""The project image tag the components run in: ``lf2:<version>-<git sha>`` (CPU) and ``...-gpu``.

``docker/build.py`` (``make images``) tags the images it builds this way, and ``lf2 pipeline compile``
uses :func:`default_image` unless ``--image`` or ``$LF2_IMAGE`` says otherwise. Inside a built image
``$LF2_IMAGE`` holds the image's own tag (set at build time), so code running there agrees with the host.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
IMAGE_REPO = "lf2"
SUFFIX = {"cpu": "", "gpu": "-gpu"}


def version() -> str:
    from lf2core import __version__

    return __version__


def git_sha(repo: Path = REPO) -> Optional[str]:
    """Short commit id of ``repo`` (None when it is not a git checkout or git is missing)."""
    if not (repo / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def image_tag(variant: str = "cpu", repo: str = IMAGE_REPO, sha: Optional[str] = None) -> str:
    """``<repo>:<version>-<sha>[-gpu]``; ``<repo>:<version>[-gpu]`` when no commit id is known."""
    if variant not in SUFFIX:
        raise ValueError(f"image variant must be one of {sorted(SUFFIX)}, got {variant!r}")
    sha = sha if sha is not None else git_sha()
    return f"{repo}:{version()}{'-' + sha if sha else ''}{SUFFIX[variant]}"


def default_image() -> str:
    """``$LF2_IMAGE`` if set, else the CPU tag of this checkout (what ``make images`` builds)."""
    return os.environ.get("LF2_IMAGE") or image_tag("cpu")
