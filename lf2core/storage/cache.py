"""Where ``local_path`` keeps downloaded s3:// inputs: ``set_cache_dir`` (``cfg.data.cache_dir``), else
``$LF2_CACHE_DIR``, else ``~/.cache/lf2``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

_cache_dir_override: Optional[Path] = None


def set_cache_dir(path: Optional[str | os.PathLike]) -> None:
    """Where ``local_path`` downloads s3:// inputs (``cfg.data.cache_dir``); ``None``/"" = default."""
    global _cache_dir_override
    _cache_dir_override = Path(path).expanduser() if path else None


def cache_dir() -> Path:
    if _cache_dir_override is not None:
        return _cache_dir_override
    env = os.environ.get("LF2_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lf2"


def cache_slot(uri: str, fingerprint: str) -> Path:
    """The cache directory of ``uri`` in the state ``fingerprint`` (its objects' ETags)."""
    h = hashlib.sha256(uri.encode()).hexdigest()[:20]
    return cache_dir() / "s3" / h / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
