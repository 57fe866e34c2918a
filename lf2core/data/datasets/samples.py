"""The dataset model shared by every format: ``Sample``, ``Splits``, their statistics and training labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...errors import DataError

FORMATS = ("market1501", "dukemtmc", "msmt17", "folder")
SPLIT_NAMES = ("train", "query", "gallery")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
#: pid of a train image without an identity (unlabelled target data; -1 is junk and never kept)
UNLABELLED = -2


class Sample(NamedTuple):
    """One image: absolute local ``path``, identity ``pid`` (as in the dataset, ``UNLABELLED`` when the
    image has none) and 0-based ``camid``."""

    path: str
    pid: int
    camid: int


@dataclass
class Splits:
    """A parsed dataset: three lists of ``Sample``.

    ``root`` is the root as given (a local path made absolute, or an s3:// URI); ``local_root`` is the
    local directory that ``root`` stands for (the download cache for s3://). Every sample path lies under
    ``local_root``, which is what the manifest stores paths relative to.
    """

    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    name: str = ""
    root: str = ""
    local_root: str = ""

    def __repr__(self) -> str:
        n = ", ".join(f"{s}={len(self.split(s))}" for s in SPLIT_NAMES)
        return f"Splits(name={self.name!r}, root={self.root!r}, {n})"

    def split(self, which: str) -> list[Sample]:
        if which not in SPLIT_NAMES:
            raise DataError(f"unknown split '{which}' (valid: {', '.join(SPLIT_NAMES)})")
        return getattr(self, which)

    def stats(self) -> dict[str, dict[str, int]]:
        """``{"train": {"identities", "images", "cameras"[, "unlabelled"]}, "query": ..., "gallery": ...}``."""
        return {s: split_stats(self.split(s)) for s in SPLIT_NAMES}


def split_stats(samples: list[Sample]) -> dict[str, int]:
    """Distinct identities, images and distinct cameras of one list of samples.

    Unlabelled images (pid ``UNLABELLED``) count as images but not as an identity; when there are any,
    their number is added as ``"unlabelled"`` (the key is absent otherwise).
    """
    out = {
        "identities": len({s.pid for s in samples if s.pid != UNLABELLED}),
        "images": len(samples),
        "cameras": len({s.camid for s in samples}),
    }
    unlabelled = count_unlabelled(samples)
    if unlabelled:
        out["unlabelled"] = unlabelled
    return out


def count_unlabelled(samples: list[Sample]) -> int:
    """How many of ``samples`` have no identity (pid ``UNLABELLED``)."""
    return sum(s.pid == UNLABELLED for s in samples)


REQUIRED_SPLITS = {"source": ("train",), "target": ("train", "query", "gallery")}


def role_problems(splits: "Splits", role: str) -> list[str]:
    """Why ``splits`` cannot serve as the ``source`` or ``target`` domain (empty list: it can). The one
    rule set behind ``prepare-data``'s refusal and ``lf2 data check --role``: the splits a role needs
    must be non-empty, and a source domain must be labelled."""
    problems = [f"split '{name}' is empty" for name in REQUIRED_SPLITS[role] if not splits.split(name)]
    n = count_unlabelled(splits.train)
    if role == "source" and n:
        first = next(s.path for s in splits.train if s.pid == UNLABELLED)
        problems.append(f"{n} unlabelled train image(s) (e.g. {first}); the source domain must be labelled: put "
                        f"every train image in an identity folder (or give its pid in manifest.csv)")
    return problems


def relabel(samples: list[Sample]) -> np.ndarray:
    """Training labels 0..n-1 for the samples' pids (in increasing pid order); int64 array [N].

    ``Sample.pid`` is left untouched; use this where a classifier needs contiguous labels.
    """
    pids = np.fromiter((s.pid for s in samples), dtype=np.int64, count=len(samples))
    if len(pids) and pids.min() < 0:
        bad = samples[int(np.argmin(pids))]
        if bad.pid == UNLABELLED:
            raise DataError(f"{bad.path}: unlabelled image (pid {UNLABELLED}, no identity) cannot be used as a "
                            "training label")
        raise DataError(f"{bad.path}: negative pid {bad.pid} cannot be used as a training label")
    _, labels = np.unique(pids, return_inverse=True)
    return labels.astype(np.int64).reshape(-1)

