"""The files stages pass to each other: every file name is defined here once, with one typed reader and
one writer per file. Stages, components, the in-process runner and the benchmarks use only these.

Stage outputs (a directory: local path or s3:// URI)::

    prepare-data      manifest.json (``read_manifest`` -> {"source", "target": Splits}), stats.json
    pretrain-source   model.pt (lf2 checkpoint, kind "source"), metrics.json {"final", "history"}
    extract-features  features.npz (``Features``), meta.json
    cluster           labels.npz (``PseudoLabels``: training labels + centroids), stats.json, cluster_stats.png
    finetune          student.pt + teacher.pt (lf2 checkpoints, kind "lf2"), metrics.json {"final", "history"}
    evaluate          metrics.json {"mAP", "R1", "R5", "R10", "mINP"}, ranklist.png
    run-local run dir run_config.json, summary.json

Writers take the scratch directory a stage writes into (``storage.output_dir``); readers take the
output location (or, where noted, the file itself) and raise ``DataError`` / ``CheckpointError`` naming
the file when it is missing or malformed. A model output is read with ``read_model`` (one loader for every
use: the mean teacher that extract/finetune continue from, the evaluated network of evaluate/register).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch

from . import storage
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError, DataError
from .kept_models import kept_model
from .variants import LABEL_SETS, get_variant

MANIFEST = "manifest.json"
DATA_STATS = "stats.json"
SOURCE_MODEL = "model.pt"
STUDENT = "student.pt"
TEACHER = "teacher.pt"
FEATURES = "features.npz"
FEATURES_META = "meta.json"
LABELS = "labels.npz"
CLUSTER_STATS = "stats.json"
CLUSTER_PLOT = "cluster_stats.png"
METRICS = "metrics.json"
RANKLIST = "ranklist.png"
RUN_CONFIG = "run_config.json"
RUN_SUMMARY = "summary.json"
MODEL_FILES = (STUDENT, TEACHER, SOURCE_MODEL)  # what a model output may hold


def locate(location: str, name: str) -> str:
    """``location`` itself when it names a file of ``name``'s type, else ``location/name``."""
    if str(location).endswith(Path(name).suffix):
        return str(location)
    return storage.join(location, name)


# ------------------------------------------------------------------------------------------ JSON
def write_json(path: Path, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """``obj`` as JSON text (+ newline) at the local ``path`` (inside a stage's scratch directory)."""
    Path(path).write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, default=float) + "\n")


def read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{uri}: invalid JSON ({e})") from None


def write_metrics(out_dir: Path, metrics: Mapping[str, Any], history: Optional[list] = None) -> None:
    """``metrics.json``: the metrics themselves (evaluate) or, with ``history`` (training stages),
    ``{"final": metrics, "history": [per-epoch rows]}``."""
    obj = dict(metrics) if history is None else {"final": dict(metrics), "history": history}
    write_json(Path(out_dir) / METRICS, obj)


def read_metrics(location: str) -> dict[str, Any]:
    """The JSON object of ``location/metrics.json`` (or of the given .json file)."""
    uri = locate(location, METRICS)
    data = read_json(uri)
    if not isinstance(data, dict):
        raise DataError(f"{uri}: expected a JSON object of metrics")
    return data


def read_final_metrics(location: str) -> dict[str, Any]:
    """The ``final`` metrics of a training stage output (``{}`` when it has none)."""
    return read_metrics(location).get("final", {})


# ------------------------------------------------------------------------------------------ manifest
def read_manifest(location: str) -> dict[str, Any]:
    """A prepare-data output (format: ``lf2core.data.manifest``) -> ``{"source", "target": Splits}``."""
    from .data.manifest import read_manifest as _read

    return _read(location)


def read_split(location: str, name: str) -> list:
    """One split (``{source,target}_{train,query,gallery}``) of a prepare-data output: ``[Sample]``."""
    from .data.manifest import split

    return split(read_manifest(location), name)


def write_manifest(out_dir: Any, source: Any, target: Any) -> str:
    from .data.manifest import write_manifest as _write

    return _write(out_dir, source, target)


# ------------------------------------------------------------------------------------------ npz
def read_npz(uri: str, what: str) -> tuple[dict[str, np.ndarray], bytes]:
    """The one .npz reader: ({name: array}, raw bytes); DataError naming ``uri`` (no pickles)."""
    return storage.read_npz(uri, what)


def _missing(uri: str, name: str, arrays: Mapping[str, Any], what: str = "array") -> DataError:
    return DataError(f"{uri}: missing {what} '{name}' (found: {', '.join(sorted(arrays)) or 'none'})")


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------ features
def feature_names(num_parts: int) -> list[str]:
    """Names of the K+1 fusion features in features.npz: ``global, upper, lower`` (K=2), else
    ``global, part1..partK``."""
    if num_parts == 2:
        return list(LABEL_SETS)
    return ["global", *[f"part{j}" for j in range(1, num_parts + 1)]]


@dataclass
class Features:
    """features.npz: ``sets`` {name: float32 [N, C]} (``global`` first; L2-normalised fusion features,
    rows in manifest order), ``pids`` / ``camids`` int64 [N] (ground truth; -1 where unknown)."""

    sets: dict[str, np.ndarray]
    pids: np.ndarray
    camids: np.ndarray


def write_features(out_dir: Path, features: Features, meta: Mapping[str, Any]) -> None:
    _write_npz(Path(out_dir) / FEATURES, {**features.sets, "pids": features.pids, "camids": features.camids})
    write_json(Path(out_dir) / FEATURES_META, meta, sort_keys=False)


def read_features(location: str) -> Features:
    """features.npz of an extract-features output (or the file). DataError naming the file when it is
    missing, unreadable or inconsistent (shapes, dtypes, non-finite values)."""
    uri = locate(location, FEATURES)
    arrays, _ = read_npz(uri, "features")
    for key in ("global", "pids", "camids"):
        if key not in arrays:
            raise _missing(uri, key, arrays)
    names = ["global"] + [k for k in arrays if k not in ("pids", "camids", "global")]
    n = arrays["global"].shape[0] if arrays["global"].ndim == 2 else -1
    sets: dict[str, np.ndarray] = {}
    for k in names:
        a = arrays[k]
        if a.ndim != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{uri}: array '{k}' must be a float [N, C] matrix with N = {n}, got {a.dtype} {a.shape}")
        if not np.isfinite(a).all():
            raise DataError(f"{uri}: array '{k}' contains NaN or infinite values")
        sets[k] = a
    ids = {}
    for k in ("pids", "camids"):
        a = arrays[k]
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{uri}: array '{k}' must be an integer vector of length {n}, got {a.dtype} {a.shape}")
        ids[k] = a.astype(np.int64)
    return Features(sets, ids["pids"], ids["camids"])


# ------------------------------------------------------------------------------------------ labels
@dataclass
class PseudoLabels:
    """labels.npz: the training labels of one round and the classifier initialisation.

    ``sets``: int64 [N] per label set (``global``, ``upper``, ``lower``; rows = target train split in
    manifest order) with the outlier policy applied (-1 = never sampled) and the global labels numbered
    0..G-1; ``centroids``: float32 [G, C], row k = the L2-normalised mean global fusion feature of global
    class k (``cluster.classifier_init = centres``: the k-means centre of cluster k, G = K, and classes
    left empty by k-means keep their row and number). ``raw``: the file's bytes (a fingerprint of the
    labels; empty when not read from a file).
    """

    sets: dict[str, np.ndarray]
    centroids: np.ndarray
    raw: bytes = field(default=b"", repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.centroids.shape[0])


def write_labels(out_dir: Path, labels: PseudoLabels) -> None:
    _write_npz(Path(out_dir) / LABELS, {**labels.sets, "centroids": labels.centroids})


def labels_file(location: str) -> str:
    return locate(location, LABELS)


def read_labels(location: str, num_samples: int, names: Iterable[str] = LABEL_SETS) -> PseudoLabels:
    """labels.npz of a cluster output (or the file), label sets ``names`` only. DataError naming the file
    when it is missing or malformed, does not match the split size (``num_samples``), has fewer than 2
    global classes, or its centroids do not match the global labels."""
    uri = labels_file(location)
    arrays, raw = read_npz(uri, "pseudo labels")
    sets: dict[str, np.ndarray] = {}
    for name in names:
        if name not in arrays:
            raise _missing(uri, name, arrays, "label array")
        a = arrays[name]
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{uri}: '{name}' must be a 1-D integer array, got {a.dtype} {a.shape}")
        if len(a) != num_samples:
            raise DataError(f"{uri}: '{name}' has {len(a)} labels but the target train split has {num_samples} images")
        if (a < -1).any():
            raise DataError(f"{uri}: '{name}' has labels below -1")
        sets[name] = a.astype(np.int64)
    g = int(sets["global"].max()) + 1 if "global" in sets and len(sets["global"]) else 0
    if g < 2:
        raise DataError(f"{uri}: {g} global cluster(s); finetuning needs at least 2")
    c = arrays.get("centroids")
    if c is None:
        raise _missing(uri, "centroids", arrays)
    # more rows than the largest label + 1: k-means centres of empty clusters (cluster.classifier_init=centres)
    if c.ndim != 2 or c.shape[0] < g or not np.issubdtype(c.dtype, np.floating):
        raise DataError(f"{uri}: 'centroids' must be a float [{g}, C] matrix (one row per global class), "
                        f"got {c.dtype} {c.shape}")
    return PseudoLabels(sets, c.astype(np.float32), raw)


def write_cluster_stats(out_dir: Path, stats: Mapping[str, Any]) -> None:
    write_json(Path(out_dir) / CLUSTER_STATS, stats, sort_keys=False)


def read_cluster_stats(location: str) -> dict[str, Any]:
    return read_json(storage.join(location, CLUSTER_STATS))


# ------------------------------------------------------------------------------------------ models
def write_source_model(out_dir: Path, state: Mapping[str, torch.Tensor], cfg: Any, extra: Mapping[str, Any]) -> None:
    """``model.pt``: the source model's CPU state dict as an lf2 checkpoint of kind ``source``."""
    save_checkpoint(str(Path(out_dir) / SOURCE_MODEL), state, "source", cfg, extra=extra)


def write_mean_teacher(out_dir: Any, mt: Any, cfg: Any, extra: Optional[Mapping[str, Any]] = None) -> None:
    """A finetune output's weights: ``student.pt`` (keys ``student.*`` and ``fuse.*``) and ``teacher.pt``
    (the teacher's bare ``LF2Model`` keys), both lf2 checkpoints of kind ``lf2`` with ``num_parts`` /
    ``attention_reduction`` / ``last_stride`` (and ``extra``, e.g. ``variant``, ``round``) recorded."""
    meta = {
        "num_parts": mt.student.num_parts,
        "attention_reduction": mt.student.reduction,
        "last_stride": mt.student.last_stride,
        **dict(extra or {}),
    }
    s_state = {**{f"student.{k}": v for k, v in mt.student.state_dict().items()},
               **{f"fuse.{k}": v for k, v in mt.fuse.state_dict().items()}}
    save_checkpoint(storage.join(str(out_dir), STUDENT), s_state, "lf2", cfg,
                    extra={"arch": mt.student.arch, "num_classes": mt.student.num_classes, **meta})
    save_checkpoint(storage.join(str(out_dir), TEACHER), mt.teacher, "lf2", cfg, extra=meta)


FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class StageModel:
    """A model stage output, read with ``read_model``: a pretrain output (``model.pt``, kind ``source``), a
    finetune output (``student.pt`` + ``teacher.pt``, kind ``lf2``) or one checkpoint file.

    ``mean_teacher()``: the ``MeanTeacher`` that extract-features and finetune continue from (round 0:
    built from the source model with ``build_target_model``, seeded heads). ``eval_network()``: the
    evaluated eval-mode network (source: ``SourceModel``; lf2: the teacher ``LF2Model``), its feature
    function [B,3,H,W] -> [B,D] (``Variant.test_feature`` of the recorded variant) and an info dict
    ``{"checkpoint", "kind", "variant", "arch"}``.
    """

    def __init__(self, cfg: Any, location: str, kind: str, path: str, student: Optional[str] = None) -> None:
        self.cfg, self.location, self.kind, self.path, self.student_path = cfg, location, kind, path, student
        self._ck: Optional[dict] = None

    def _check_arch(self, ck: dict, path: str) -> None:
        """The network is built from the checkpoint; a config that names another one is refused, not ignored."""
        if ck["arch"] != self.cfg.model.arch:
            raise CheckpointError(f"checkpoint {path}: holds a {ck['arch']} network but config key 'model.arch' is "
                                  f"{self.cfg.model.arch!r}; use the recipe it was trained with (or --set "
                                  f"model.arch={ck['arch']})")

    @property
    def checkpoint(self) -> dict:
        """The evaluated checkpoint (teacher.pt / model.pt / the given file), read once."""
        if self._ck is None:
            self._ck = load_checkpoint(self.path)
        return self._ck

    def mean_teacher(self) -> Any:
        import copy

        from .models.teacher import build_target_model, load_mean_teacher

        kept = kept_model(self.location)
        if kept is not None:
            return copy.deepcopy(kept.model)
        cfg = self.cfg
        if self.kind == "source":
            ck = load_checkpoint(self.path, kind="source")
            self._check_arch(ck, self.path)
            return build_target_model(cfg, ck)
        if self.student_path is None:
            raise CheckpointError(f"model {self.location}: a teacher alone; extract/finetune need a pretrain "
                                  f"output ({SOURCE_MODEL}) or a finetune output ({STUDENT} + {TEACHER})")
        s, t = load_checkpoint(self.student_path, kind="lf2"), load_checkpoint(self.path, kind="lf2")
        self._check_arch(s, self.student_path)
        return load_mean_teacher(
            s["state_dict"], t["state_dict"], s["arch"],
            num_parts=int(s.get("num_parts", cfg.model.num_parts)),
            reduction=int(s.get("attention_reduction", cfg.model.attention_reduction)),
            last_stride=int(s.get("last_stride", cfg.model.last_stride)),
        )

    def eval_network(self) -> tuple[torch.nn.Module, FeatureFn, dict[str, Any]]:
        from .models import LF2Model, SourceModel

        ck, path, cfg = self.checkpoint, self.path, self.cfg
        self._check_arch(ck, path)
        state = ck["state_dict"]
        mcfg = (ck.get("config") or {}).get("model", {})

        def setting(key: str, cfg_key: str) -> int:
            return int(ck.get(key, mcfg.get(cfg_key, getattr(cfg.model, cfg_key))))

        if ck["kind"] == "source":
            n = int(ck.get("num_classes") or state["classifier.weight"].shape[0])
            net: torch.nn.Module = SourceModel(ck["arch"], n, "none", setting("last_stride", "last_stride"))
            variant = get_variant("source", trainable=False)
        elif ck["kind"] == "lf2":
            if "classifier.weight" not in state:
                raise CheckpointError(f"checkpoint {path}: not a teacher LF2Model state dict (no classifier.weight)")
            net = LF2Model(ck["arch"], int(state["classifier.weight"].shape[0]),
                           num_parts=setting("num_parts", "num_parts"),
                           reduction=setting("attention_reduction", "attention_reduction"),
                           weights="none", last_stride=setting("last_stride", "last_stride"))
            variant = get_variant(str(ck.get("variant", "lf2")))
        else:
            raise CheckpointError(f"checkpoint {path}: kind {ck['kind']!r} cannot be evaluated (expected source or lf2)")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: does not match its {ck['arch']} network: {e}") from None

        def fn(x: torch.Tensor, _net: torch.nn.Module = net) -> torch.Tensor:
            return variant.test_feature(_net, x)

        info = {"checkpoint": path, "kind": ck["kind"], "variant": variant.name, "arch": ck["arch"]}
        return net.eval(), fn, info


def read_model(cfg: Any, location: str) -> StageModel:
    """The model held by a stage output (or an lf2 checkpoint file); ``CheckpointError`` naming the
    location when it is neither."""
    m = str(location)
    if m.endswith((".pt", ".pth")):
        return StageModel(cfg, m, load_checkpoint(m)["kind"], m)
    teacher, student = storage.join(m, TEACHER), storage.join(m, STUDENT)
    if storage.exists(teacher):
        return StageModel(cfg, m, "lf2", teacher, student if storage.exists(student) else None)
    source = storage.join(m, SOURCE_MODEL)
    if storage.exists(source):
        return StageModel(cfg, m, "source", source)
    raise CheckpointError(f"model {m}: neither a finetune output ({STUDENT} + {TEACHER}) nor a pretrain "
                          f"output ({SOURCE_MODEL})")


def model_digests(location: str) -> list[tuple[str, str]]:
    """(file name, SHA-256 hex) of each model file present in a model output, in ``MODEL_FILES`` order (those
    recorded with a model kept in memory, ``lf2core.kept_models``, while its files are unchanged)."""
    import hashlib

    kept = kept_model(location)
    if kept is not None:
        return list(kept.digests)
    out = []
    for name in MODEL_FILES:
        uri = storage.join(location, name)
        if storage.exists(uri):
            out.append((name, hashlib.sha256(storage.read_bytes(uri)).hexdigest()))
    return out
