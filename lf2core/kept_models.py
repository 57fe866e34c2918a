"""Models kept in memory between the stages of one process (``lf2core.stages.rounds.StageRunner``): the last
finetuned ``MeanTeacher`` and its file digests, handed to the next stages instead of being read back from
its files, and only while those files are unchanged (``storage.version``). ``lf2core.artifacts`` consults
it in ``read_model(...).mean_teacher()`` and ``model_digests``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from . import storage


@dataclass
class _KeptModel:
    location: str
    versions: list[Optional[str]]  # storage.version of each MODEL_FILES entry when kept
    digests: list[tuple[str, str]]
    model: Any  # the MeanTeacher, on the CPU


_KEEP: dict[str, Any] = {"on": False, "model": None}


@contextlib.contextmanager
def models_in_memory() -> Iterator[None]:
    """Within this block (one process running several stages: ``lf2core.stages.rounds.StageRunner``) the
    last finetune output's ``MeanTeacher`` stays in memory (``keep_model``): ``artifacts.read_model(cfg,
    location).mean_teacher()`` returns a copy of it and ``artifacts.model_digests`` its recorded digests
    instead of reading the files again, as long as those files are unchanged (``storage.version``). One
    model is kept at a time; it is dropped when the block ends."""
    before = dict(_KEEP)
    _KEEP.update(on=True, model=None)
    try:
        yield
    finally:
        _KEEP.clear()
        _KEEP.update(before)


def keeping_models() -> bool:
    """True inside ``models_in_memory``."""
    return bool(_KEEP["on"])


def keep_model(location: str, mt: Any, digests: list[tuple[str, str]]) -> None:
    """Keep a copy of ``mt`` (the CPU ``MeanTeacher`` just committed to ``location``, whose files have
    ``digests``: ``artifacts.model_digests`` of what was written) when ``models_in_memory`` is on; else a
    no-op."""
    import copy

    if not _KEEP["on"]:
        return
    kept = copy.deepcopy(mt)
    for p in kept.parameters():
        p.grad = None
    _KEEP["model"] = _KeptModel(str(location), _versions(str(location)), list(digests), kept)


def _versions(location: str) -> list[Optional[str]]:
    from .artifacts import MODEL_FILES

    return [storage.version(storage.join(location, n)) for n in MODEL_FILES]


def kept_model(location: str) -> Optional[_KeptModel]:
    """The model kept for ``location`` (``.model``, ``.digests``) while its files are unchanged, else None."""
    k = _KEEP.get("model")
    if k is None or k.location != str(location) or _versions(str(location)) != k.versions:
        return None
    return k


