"""lf2 checkpoints (final weights passed between stages) and resumable training state.

Checkpoint file (``save_checkpoint`` / ``load_checkpoint``), a ``torch.save`` dict readable with
``torch.load(weights_only=True)``::

    {"format": "lf2-checkpoint/1", "kind": "source" | "lf2" | ..., "arch": str, "num_classes": int,
     "state_dict": {name: tensor (CPU)}, "config": Config.to_dict(), ...extra}

Training state (``save_state`` / ``load_state``), also weights-only::

    {"format": "lf2-state/1", "epoch": int (epochs completed), "model": state_dict,
     "optimizer": state_dict, "scheduler": state_dict | None, "rng": {...}, "extra": dict}

Both are written atomically through ``lf2core.storage.write_bytes`` (local path or s3:// URI).
``TrainingState`` is the one resume helper of the training stages (where the state lives, which run it
belongs to: ``fingerprint``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import storage
from .errors import CheckpointError, Lf2Error, StorageError

CHECKPOINT_FORMAT = "lf2-checkpoint/1"
STATE_FORMAT = "lf2-state/1"
STATE_FILE = "state.pt"  # the resumable training state inside a stage's work dir


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _read(uri: str, what: str) -> Any:
    try:
        data = storage.read_bytes(uri)
    except Lf2Error as e:
        raise CheckpointError(f"{what} {uri}: cannot be read ({e})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} {uri}: corrupt or not a weights-only torch file ({type(e).__name__}: {e})") from None


def save_checkpoint(
    path: str,
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    kind: str,
    config: Any,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Write an lf2 checkpoint to ``path`` (local or s3://) atomically; returns the dict written.

    ``arch`` and ``num_classes`` come from the model's attributes (or ``config.model.arch`` and the
    ``classifier.weight`` rows for a bare state dict); ``extra`` entries are added (and may override).
    """
    cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
        arch = getattr(model_or_state, "arch", None)
        num_classes = getattr(model_or_state, "num_classes", None)
    else:
        state, arch, num_classes = dict(model_or_state), None, None
    if arch is None:
        arch = cfg_dict.get("model", {}).get("arch")
    if num_classes is None:
        for key in ("classifier.weight", "student.classifier.weight", "teacher.classifier.weight"):
            if key in state:
                num_classes = int(state[key].shape[0])
                break
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "arch": arch,
        "num_classes": num_classes,
        "state_dict": _cpu_state(state),
        "config": cfg_dict,
    }
    ckpt.update(extra or {})
    storage.write_bytes(path, _to_bytes(ckpt))
    return ckpt


def load_checkpoint(path_or_uri: str, kind: Optional[str] = None) -> dict[str, Any]:
    """Read an lf2 checkpoint (weights only). ``CheckpointError`` naming the file if missing, corrupt,
    not an lf2 checkpoint, or (when ``kind`` is given) of another kind."""
    ckpt = _read(path_or_uri, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path_or_uri}: not an {CHECKPOINT_FORMAT} file (format: {found!r})")
    for key in ("kind", "state_dict", "arch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path_or_uri}: missing entry {key!r}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"checkpoint {path_or_uri}: kind {ckpt['kind']!r}, expected {kind!r}")
    return ckpt


# ------------------------------------------------------------------------------------------ training state
def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states in a weights-only-loadable form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def cuda_device_count() -> int:
    """CUDA devices present (0 without CUDA): how many saved CUDA RNG states can be restored."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def set_rng_states(states: Mapping[str, Any], device_count: Optional[int] = None) -> None:
    """Restore what ``rng_states`` returned. CUDA states are restored by device index for the devices
    present (``device_count``, default ``cuda_device_count()``); states of devices this host lacks (a state
    saved on a host with more GPUs) are skipped with a warning, and devices beyond the saved ones keep theirs."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    saved = list(states.get("cuda") or [])
    if saved:
        present = cuda_device_count() if device_count is None else int(device_count)
        for i, st in enumerate(saved[:present]):
            torch.cuda.set_rng_state(st, i)
        if len(saved) > present:
            logging.getLogger(__name__).warning(
                "training state: CUDA RNG states of %d device(s) saved, %d present here; restored %d, "
                "skipped device(s) %s", len(saved), present, min(present, len(saved)),
                ", ".join(str(i) for i in range(present, len(saved))))


def save_state(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Atomically write the resumable state after ``epoch`` completed epochs (model, optimiser,
    scheduler, RNG states, ``extra`` such as metrics history)."""
    state = {
        "format": STATE_FORMAT,
        "epoch": int(epoch),
        "model": _cpu_state(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states(),
        "extra": dict(extra or {}),
    }
    storage.write_bytes(path, _to_bytes(state))


def load_state(
    path: str,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a ``save_state`` file into ``model`` / ``optimizer`` / ``scheduler`` (in place).

    Returns ``{"epoch": int, "extra": dict}``. ``CheckpointError`` naming the file when it is corrupt
    or does not fit the model.
    """
    state = _read(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"training state {path}: not an {STATE_FORMAT} file")
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"training state {path}: does not fit the model being trained ({e})") from None
    if restore_rng and state.get("rng"):
        set_rng_states(state["rng"])
    return {"epoch": int(state["epoch"]), "extra": state.get("extra", {})}


# ------------------------------------------------------------------------------- resumable-state location
def work_dir(out: str, stage: str) -> str:
    """Where a training stage keeps its resumable state while it runs: ``$LF2_WORK_DIR/<stage>-<hash of
    out>`` when set, else ``<out>.partial`` next to the output (local or s3://)."""
    env = os.environ.get("LF2_WORK_DIR")
    if env:
        return storage.join(env, f"{stage}-" + hashlib.sha256(str(out).encode()).hexdigest()[:12])
    return str(out).rstrip("/") + ".partial"


def release_work_dir(work: str) -> None:
    """Drop the resumable state (``STATE_FILE``, nothing else) once the stage output is committed (local
    directory - removed when left empty - or s3:// prefix); a failure to delete is logged, not raised: the
    output is already complete."""
    try:
        storage.remove_files(work, [STATE_FILE])
    except (StorageError, OSError) as e:
        logging.getLogger(__name__).warning("training state left at %s (%s); remove it when no longer needed",
                                            work, e)


def fingerprint(settings: Any, blobs: Sequence[bytes] = ()) -> str:
    """16 hex digits of SHA-256 over ``blobs`` then the JSON of ``settings``: a training state is resumed
    only by a run with the same inputs (``blobs``) and the same trajectory-shaping settings."""
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class TrainingState:
    """The resumable state of one training stage run: ``<work>/state.pt`` with ``<work>`` =
    ``work_dir(out, stage)``, valid only for the run whose ``key`` (``fingerprint``) it records.

    ``load`` restores a matching state into the given objects (in place) and returns ``{"epoch", "extra"}``;
    it returns None when there is no state, when it is unusable, or when it belongs to other inputs or
    settings (the objects may then have been modified: rebuild them). ``save`` writes one atomically,
    ``release`` drops it once the stage output is committed.
    """

    def __init__(self, out: str, stage: str, key: str) -> None:
        self.work = work_dir(out, stage)
        self.uri = storage.join(self.work, STATE_FILE)
        self.key = key
        self.stage = stage

    def exists(self) -> bool:
        return storage.exists(self.uri)

    def load(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             scheduler: Any = None) -> Optional[dict[str, Any]]:
        log = logging.getLogger(__name__)
        if not self.exists():
            return None
        try:
            info = load_state(self.uri, model, optimizer, scheduler)
        except CheckpointError as e:
            log.warning("%s: ignoring unusable training state (%s); starting from scratch", self.stage, e)
            return None
        if info["extra"].get("config_key") != self.key:
            log.warning("%s: training state %s is for other inputs or another config; starting from scratch",
                        self.stage, self.uri)
            return None
        log.info("%s: resuming from %s after epoch %d", self.stage, self.uri, info["epoch"])
        return info

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
             **extra: Any) -> None:
        save_state(self.uri, model, optimizer, scheduler, epoch, extra={"config_key": self.key, **extra})

    def release(self) -> None:
        release_work_dir(self.work)
