"""Stage finetune: one LF2 round of mean-teacher training on the target pseudo labels.

``finetune(cfg, data, labels, model, out, round_index=0)``

- ``data``: prepare-data output (the target train split, in manifest order = the rows of the labels);
- ``labels``: cluster output (``labels.npz``: int64 ``global``, ``upper``, ``lower`` [N], -1 = outlier;
  optional float ``centroids_global`` [G', C]); the outlier policy ``cfg.cluster.outliers`` is applied
  here (``drop``: outliers are never sampled; ``singleton``: one class each);
- ``model``: pretrain output (round 0: student and teacher built from ``model.pt`` with
  ``build_target_model``, the same seeded heads the extract stage used) or the previous finetune output
  (``student.pt`` + ``teacher.pt``, Fuse included).

The round (``lf2core.trainers`` has the step and its definition):

1. classifier of student and teacher := L2-normalised centroids of the global clusters, computed on the
   global FUSION features (``centroids_global`` of labels.npz when the cluster stage wrote it, else one
   extraction pass over the target train set with the current model -- the same features);
2. ``epochs_per_round`` epochs of ``iters_per_epoch`` iterations; every epoch a fresh Adam and three
   identity-balanced loaders (global, upper, lower labels; ``mt_global``: global only) with random erasing
   ``finetune.random_erasing``; EMA teacher update every step with the global step counted across rounds.

Resume: the full training state (student, teacher, Fuse, Adam, running loss sums, RNG) is written to
``<work>/state.pt`` after every epoch and every ``checkpoint_every`` iterations, ``<work>`` =
``$LF2_WORK_DIR/finetune-<hash of out>`` or ``<out>.partial`` next to the output (local or s3://). A new
call with the same inputs and config continues from there; batches are a function of (seed, round,
epoch, label set, batch number) only, so a resumed round ends with the same weights as an uninterrupted one.

Outputs: ``out/student.pt`` (``student.*`` + ``fuse.*``), ``out/teacher.pt`` (bare ``LF2Model`` keys), both
kind ``lf2`` with ``variant``, ``round``, ``global_step`` recorded; ``out/metrics.json``
``{"final": {...}, "history": [per-epoch means]}``. Returns the final metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from .. import checkpoint, storage
from ..checkpoint import load_state, save_state
from ..config import Config
from ..errors import CheckpointError, DataError
from ..features import extract, progress_enabled
from ..runtime import select_device
from ..trainers import (
    LABEL_SETS,
    Finetuner,
    StepSettings,
    class_centroids,
    global_step,
    teacher_tail,
    prepare_label_sets,
    round_loaders,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
DEFAULT_CHECKPOINT_EVERY = 100  # iterations; overridden by $LF2_CHECKPOINT_EVERY or the argument


def work_dir(out: str) -> str:
    """Where the resumable state lives while training (``lf2core.checkpoint.work_dir``)."""
    return checkpoint.work_dir(out, "finetune")


def labels_file(labels: str) -> str:
    return str(labels) if str(labels).endswith(".npz") else storage.join(labels, "labels.npz")


def load_labels(labels: str, num_samples: int, variant: str = "lf2") -> tuple[dict[str, np.ndarray], bytes]:
    """Read labels.npz -> ({name: int64 [N]} (+ ``centroids_global`` when present), raw bytes).
    ``DataError`` naming the file when it is missing, malformed or does not match the split size."""
    uri = labels_file(labels)
    arrays, raw = storage.read_npz(uri, "pseudo labels")
    needed = LABEL_SETS[:1] if variant == "mt_global" else LABEL_SETS
    out: dict[str, np.ndarray] = {}
    for name in needed:
        if name not in arrays:
            raise DataError(f"{uri}: missing label array '{name}' (found: {', '.join(sorted(arrays)) or 'none'})")
        a = arrays[name]
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{uri}: '{name}' must be a 1-D integer array, got {a.dtype} {a.shape}")
        if len(a) != num_samples:
            raise DataError(f"{uri}: '{name}' has {len(a)} labels but the target train split has {num_samples} images")
        if (a < -1).any():
            raise DataError(f"{uri}: '{name}' has labels below -1")
        out[name] = a.astype(np.int64)
    if "centroids_global" in arrays:
        c = arrays["centroids_global"]
        if c.ndim != 2 or not np.issubdtype(c.dtype, np.floating):
            raise DataError(f"{uri}: 'centroids_global' must be a float [G, C] matrix, got {c.dtype} {c.shape}")
        out["centroids_global"] = c.astype(np.float32)
    return out, raw


def _fingerprint(cfg: Config, labels_bytes: bytes, model: str, round_index: int) -> str:
    """Resume only a state made from the same labels, input model and training config."""
    h = hashlib.sha256(labels_bytes)
    for name in ("student.pt", "teacher.pt", "model.pt"):
        uri = storage.join(model, name)
        if storage.exists(uri):
            h.update(name.encode())
            h.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("seed", "model", "finetune")}
    relevant["cluster.outliers"] = d["cluster"]["outliers"]
    relevant["data"] = {k: d["data"][k] for k in ("height", "width")}
    relevant["round"] = int(round_index)
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _centroids(
    cfg: Config, mt: Any, samples: list, raw: dict[str, np.ndarray], global_labels: np.ndarray, num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """[G, C] L2-normalised centroids of the global clusters on the global fusion features."""
    c = mt.student.out_channels
    given = raw.get("centroids_global")
    raw_g = raw["global"]
    policy_applied = global_labels  # renumbered 0..G-1
    if given is not None and given.shape[1] == c:
        # rows of labels.npz are indexed by the label value after the outlier policy; map them to ours
        from ..cluster import apply_outlier_policy

        orig = apply_outlier_policy(raw_g, cfg.cluster.outliers)
        valid = orig >= 0
        uniq = np.unique(orig[valid])
        if len(uniq) == num_classes and uniq.max() < given.shape[0]:
            return torch.nn.functional.normalize(torch.as_tensor(given[uniq]), dim=1)
        log.warning("labels.npz centroids_global does not match the labels; recomputing the centroids")
    from ..data.loaders import test_loader
    from ..data.transforms import test_transform

    loader = test_loader(samples, test_transform(cfg.data.height, cfg.data.width), cfg.eval.batch_size,
                         cfg.data.num_workers)
    was = mt.training
    mt.to(device).eval()
    try:
        feats = extract(lambda x: mt.fusion_features(x)[0], loader, device, flip=True, amp=cfg.amp,
                        desc="centroid features")["features"]
    finally:
        mt.train(was)
    return class_centroids(feats, policy_applied, num_classes)


def finetune(
    cfg: Config,
    data: str,
    labels: str,
    model: str,
    out: str,
    round_index: int = 0,
    *,
    on_metrics: Optional[MetricsCallback] = None,
    checkpoint_every: Optional[int] = None,
    fast: bool = True,
    teacher_tail_only: bool = True,
) -> dict[str, Any]:
    """Train one round; write ``out/student.pt``, ``out/teacher.pt``, ``out/metrics.json``.

    ``on_metrics(metrics, step)`` after every epoch (step = global step at the end of the epoch), called
    after the resumable state is saved. ``checkpoint_every``: iterations between mid-epoch states (None:
    ``$LF2_CHECKPOINT_EVERY`` or 100; 0: only at epoch ends). ``fast=False`` uses the plain reference step
    (same math, slower; for comparisons). ``teacher_tail_only`` (fast step, no fusion loss): run the
    teacher/Fuse forwards only in the last ``trainers.teacher_tail`` iterations of the round, the only ones
    whose effect on the teacher's and Fuse's BN running statistics survives to float32 precision (their
    only effect in the paper recipe); the student, the EMA and the loss are untouched by this.
    """
    from ..data.manifest import read_manifest, split
    from ..data.transforms import train_transform
    from ..models import load_target_model

    f = cfg.finetune
    settings = StepSettings.from_config(f)
    if checkpoint_every is None:
        checkpoint_every = int(os.environ.get("LF2_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY))
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    samples = split(read_manifest(data), "target_train")
    if not samples:
        raise DataError(f"{data}: the target train split is empty")
    raw, labels_bytes = load_labels(labels, len(samples), settings.variant)
    label_sets, num_classes = prepare_label_sets(raw, cfg.cluster.outliers, settings.variant)
    if num_classes < 2:
        raise DataError(f"{labels_file(labels)}: {num_classes} global cluster(s); finetuning needs at least 2")
    device = select_device(cfg.device)
    key = _fingerprint(cfg, labels_bytes, model, round_index)
    work = work_dir(out)
    state_uri = storage.join(work, checkpoint.STATE_FILE)

    def build(mt: Any, centroids: Optional[torch.Tensor]) -> tuple[Any, Finetuner]:
        if settings.variant == "lf2" and mt.student.num_parts != 2:
            raise DataError(f"{model}: finetune with labels global/upper/lower needs num_parts=2, "
                            f"the model has {mt.student.num_parts}")
        c = centroids if centroids is not None else torch.zeros(num_classes, mt.student.out_channels)
        mt.reset_classifier(c)
        mt.to(device)
        return mt, Finetuner(mt, settings, num_classes, f.lr, f.weight_decay, device, fast=fast, amp=cfg.amp)

    start_epoch, start_iter, sums, history = 0, 0, {}, []
    mt = finetuner = opt = None
    if storage.exists(state_uri):
        mt, finetuner = build(load_target_model(cfg, model)[0], None)
        opt = finetuner.new_optimizer()
        try:
            info = load_state(state_uri, mt, opt)
        except CheckpointError as e:
            log.warning("ignoring unusable training state (%s); starting the round from scratch", e)
            info = None
        if info is not None and info["extra"].get("config_key") == key:
            start_epoch = info["epoch"]
            start_iter = int(info["extra"].get("iteration", 0))
            sums = dict(info["extra"].get("sums", {}))
            history = list(info["extra"].get("history", []))
            log.info("resuming finetune round %d from %s at epoch %d iteration %d", round_index, state_uri,
                     start_epoch, start_iter)
        else:
            if info is not None:
                log.warning("training state %s is for other inputs/config; starting the round from scratch", state_uri)
            mt = finetuner = opt = None
    if mt is None:
        mt0, _ = load_target_model(cfg, model)
        cents = _centroids(cfg, mt0, samples, raw, label_sets[0], num_classes, device)
        mt, finetuner = build(mt0, cents)
        opt = None

    E, iters = f.epochs_per_round, f.iters_per_epoch
    tf = train_transform(cfg.data.height, cfg.data.width, random_erasing=f.random_erasing)
    log.info(
        "finetune round %d (%s, %d global classes, %d label sets, device %s): epochs %d..%d x %d iters",
        round_index, settings.variant, num_classes, len(label_sets), device, start_epoch, E, iters,
    )
    assert finetuner is not None
    on_metrics = on_metrics or (lambda m, s: None)

    def save(epoch: int, iteration: int, optimizer: torch.optim.Optimizer, run_sums: dict[str, float]) -> None:
        save_state(state_uri, mt, optimizer, None, epoch,
                   extra={"config_key": key, "iteration": iteration, "sums": run_sums, "history": history,
                          "num_classes": num_classes})

    tail = None
    if fast and teacher_tail_only and settings.fusion_loss_weight == 0:
        tail = teacher_tail(mt, len(label_sets))
    t_round = time.time()
    for epoch in range(start_epoch, E):
        teacher_from = 0 if tail is None else (iters if epoch < E - 1 else max(0, iters - tail))
        resumed_mid = opt is not None and epoch == start_epoch and start_iter > 0
        optimizer = opt if resumed_mid else finetuner.new_optimizer()
        first = start_iter if epoch == start_epoch else 0
        loaders = round_loaders(
            samples, label_sets, tf, f.batch_size, f.num_instances, iters, cfg.seed, round_index, epoch,
            start=first, num_workers=cfg.data.num_workers,
        )
        bar = tqdm(total=iters, initial=first, desc=f"finetune r{round_index} e{epoch + 1}/{E}", unit="it",
                   disable=not progress_enabled(), leave=False)
        t0 = time.time()
        res = finetuner.run_epoch(
            loaders, optimizer, global_step(round_index, epoch, 0, E, iters), first, iters,
            save_fn=lambda it, o, s, e=epoch: save(e, it, o, s), checkpoint_every=checkpoint_every,
            sums=sums if epoch == start_epoch else None, progress=bar, teacher_from=teacher_from,
        )
        bar.close()
        metrics = dict(res.metrics)
        metrics["epoch_seconds"] = time.time() - t0
        history.append({"epoch": epoch + 1, **metrics})
        log.info(
            "round %d epoch %d/%d loss %.3f (ce %.3f tri %.3f) acc %.3f, %.2fs/it (data %.2fs)", round_index,
            epoch + 1, E, metrics["loss"], metrics["ce"], metrics["tri_global"], metrics["acc"],
            metrics["step_seconds"] + metrics["data_seconds"], metrics["data_seconds"],
        )
        sums, opt = {}, None
        save(epoch + 1, 0, optimizer, {})
        on_metrics(metrics, global_step(round_index, epoch + 1, 0, E, iters))

    final: dict[str, Any] = {
        "round": int(round_index),
        "num_classes": int(num_classes),
        "global_step": int(global_step(round_index, E, 0, E, iters)),
        "round_seconds": time.time() - t_round,
    }
    if history:
        final.update({k: v for k, v in history[-1].items() if k != "epoch"})
    from ..models import save_mean_teacher

    mt.to("cpu").to(memory_format=torch.contiguous_format)
    with storage.output_dir(out, "finetune") as tmp:
        save_mean_teacher(mt, str(tmp), cfg, extra={
            "variant": settings.variant, "round": int(round_index), "global_step": final["global_step"],
        })
        (Path(tmp) / "metrics.json").write_text(
            json.dumps({"final": final, "history": history}, indent=2, sort_keys=True, default=float) + "\n"
        )
    checkpoint.release_work_dir(work)
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in final.items()}
