"""Stage finetune: one LF2 round of mean-teacher training on the target pseudo labels.

``finetune(cfg, data, labels, model, out, round_index=0)``

- ``data``: prepare-data output (the target train split, in manifest order = the rows of the labels);
- ``labels``: cluster output (``labels.npz``, ``lf2core.artifacts.PseudoLabels``: int64 ``global``,
  ``upper``, ``lower`` [N] training labels -- outlier policy applied by the cluster stage, -1 = never
  sampled, global classes 0..G-1 -- and float32 ``centroids`` [G, C]);
- ``model``: pretrain output (round 0: student and teacher built from ``model.pt`` with
  ``build_target_model``, the same seeded heads the extract stage used) or the previous finetune output
  (``student.pt`` + ``teacher.pt``, Fuse included).

The round (``lf2core.training`` has the step and its definition):

1. classifier of student and teacher := the L2-normalised ``centroids`` of labels.npz (the mean global
   FUSION feature of each global cluster, or the k-means centres with ``cluster.classifier_init =
   centres``, computed by the cluster stage);
2. ``epochs_per_round`` epochs of ``iters_per_epoch`` iterations; every epoch a fresh Adam and three
   loaders (global, upper, lower labels; ``mt_global``: global only; ``finetune.sampler``) with random
   erasing ``finetune.random_erasing`` (``finetune.erasing``); EMA teacher update every step with the global
   step counted across rounds.
3. ``finetune.camera_proxy_weight`` > 0: before the first epoch, one proxy per (global label, camera)
   from the teacher's global features of the target train images, and the camera proxy loss on the global
   batch every step (``lf2core.training.camera_proxy``; the memory is part of the resumable state).

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

import logging
import os
import time
from typing import Any, Optional

import torch
from tqdm import tqdm

from .. import artifacts, kept_models, storage
from ..checkpoint import TrainingState, fingerprint
from ..config import Config
from ..distributed import Dist, device_policy, setup
from ..errors import DataError
from ..features import progress_enabled
from ..training import Round, StepSettings, global_step, start_round, train_round
from .table import FINETUNE

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY = 100  # iterations; overridden by $LF2_CHECKPOINT_EVERY or the argument


def work_dir(out: str) -> str:
    """Where the resumable state lives while training (``lf2core.checkpoint.work_dir``)."""
    return TrainingState(out, FINETUNE, "").work


def _key(cfg: Config, labels: artifacts.PseudoLabels, model: str, round_index: int, world_size: int = 1) -> str:
    """Resume only a state made from the same labels, input model and training config."""
    blobs = [labels.raw]
    for name, digest in artifacts.model_digests(model):
        blobs += [name.encode(), bytes.fromhex(digest)]
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("seed", "model", "finetune")}
    if not d["finetune"]["camera_proxy_weight"]:  # off: the key of the states written before these keys existed
        relevant["finetune"] = {k: v for k, v in d["finetune"].items() if not k.startswith("camera_proxy_")}
    relevant["cluster.outliers"] = d["cluster"]["outliers"]
    relevant["data"] = {k: d["data"][k] for k in ("height", "width")}
    relevant["round"] = int(round_index)
    if world_size > 1:  # per-rank BN: N processes follow another trajectory than one
        relevant["world_size"] = int(world_size)
    return fingerprint(relevant, blobs)


def _bar(**kw: Any) -> Any:
    return tqdm(unit="it", disable=not progress_enabled(), leave=False, **kw)


def finetune(
    cfg: Config,
    data: str,
    labels: str,
    model: str,
    out: str,
    round_index: int = 0,
    *,
    checkpoint_every: Optional[int] = None,
    fast: bool = True,
    teacher_tail_only: bool = True,
) -> dict[str, Any]:
    """Train one round; write ``out/student.pt``, ``out/teacher.pt``, ``out/metrics.json``.

    ``checkpoint_every``: iterations between mid-epoch states (None:
    ``$LF2_CHECKPOINT_EVERY`` or 100; 0: only at epoch ends). ``fast=False`` uses the plain reference step
    (same math, slower; for comparisons). ``teacher_tail_only`` (fast step, no fusion loss): run the
    teacher/Fuse forwards only in the last ``training.teacher_tail`` iterations of the round, the only ones
    whose effect on the teacher's and Fuse's BN running statistics survives to float32 precision (their
    only effect in the paper recipe); the student, the EMA and the loss are untouched by this.

    Started by torchrun (``WORLD_SIZE`` > 1, ``lf2core.distributed``): data parallel over the ranks, rank 0
    writes the state and the output, the other ranks return None (docs/distributed.md).
    """
    d = setup(cfg, FINETUNE)
    with d.guard("finetune"):
        return _finetune(cfg, data, labels, model, out, round_index, d, checkpoint_every=checkpoint_every,
                         fast=fast, teacher_tail_only=teacher_tail_only)


def _finetune(cfg: Config, data: str, labels: str, model: str, out: str, round_index: int, d: Dist, *,
              checkpoint_every: Optional[int], fast: bool, teacher_tail_only: bool) -> Optional[dict[str, Any]]:
    settings = StepSettings.from_config(cfg.finetune)
    variant = settings.method
    if checkpoint_every is None:
        checkpoint_every = int(os.environ.get("LF2_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY))
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    samples = artifacts.read_split(data, "target_train")
    if not samples:
        raise DataError(f"{data}: the target train split is empty")
    pl = artifacts.read_labels(labels, len(samples), variant.label_sets)
    source = artifacts.read_model(cfg, model)

    def load_model() -> Any:
        mt = source.mean_teacher()
        if variant.num_parts is not None and mt.student.num_parts != variant.num_parts:
            raise DataError(f"{model}: finetune with labels {'/'.join(variant.label_sets)} needs "
                            f"num_parts={variant.num_parts}, the model has {mt.student.num_parts}")
        if pl.centroids.shape[1] != mt.student.out_channels:
            raise DataError(f"{artifacts.labels_file(labels)}: centroids of dimension {pl.centroids.shape[1]}, the "
                            f"model's features have {mt.student.out_channels}")
        return mt

    if cfg.finetune.batch_size % d.world_size:
        raise DataError(f"config key 'finetune.batch_size': {cfg.finetune.batch_size} does not split over "
                        f"WORLD_SIZE={d.world_size} processes")
    policy = device_policy(cfg, d)
    state = TrainingState(out, FINETUNE, _key(cfg, pl, model, round_index, d.world_size))
    rnd = Round(samples, [pl.sets[n] for n in variant.label_sets], pl.num_classes, round_index)
    ft, start = start_round(cfg, settings, rnd, load_model, pl.centroids, state, policy, fast, d)
    f = cfg.finetune
    log.info("finetune round %d (%s, %d global classes, %d label sets, device %s): epochs %d..%d x %d iters",
             round_index, settings.variant, rnd.num_classes, len(rnd.label_sets), policy.device, start.epoch,
             f.epochs_per_round, f.iters_per_epoch)
    t_round = time.time()
    train_round(cfg, settings, rnd, ft, start, state, checkpoint_every=checkpoint_every,
                teacher_tail_only=teacher_tail_only, progress=_bar)
    E, iters = f.epochs_per_round, f.iters_per_epoch
    final: dict[str, Any] = {
        "round": int(round_index),
        "num_classes": int(rnd.num_classes),
        "global_step": int(global_step(round_index, E, 0, E, iters)),
        "round_seconds": time.time() - t_round,
    }
    if rnd.history:
        final.update({k: v for k, v in rnd.history[-1].items() if k != "epoch"})
    mt = ft.mt.to("cpu").to(memory_format=torch.contiguous_format)
    if not d.main:
        d.barrier("finetune output written by rank 0")
        return None
    with storage.output_dir(out, FINETUNE) as tmp:
        artifacts.write_mean_teacher(tmp, mt, cfg, extra={
            "variant": settings.variant, "round": int(round_index), "global_step": final["global_step"],
        })
        artifacts.write_metrics(tmp, final, rnd.history)
        digests = artifacts.model_digests(str(tmp)) if kept_models.keeping_models() else []
    state.release()
    kept_models.keep_model(out, mt, digests)  # several rounds in one process: the next stages skip re-reading it
    d.barrier("finetune output written by rank 0")
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in final.items()}
