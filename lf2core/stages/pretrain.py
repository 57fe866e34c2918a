"""Stage pretrain-source: supervised training of ``SourceModel`` on the source train split.

As the released code (MMT/MEB-Net stage 1): label-smoothed CE (``pretrain.label_smoothing``) on the
classifier logits + batch-hard soft triplet (``pretrain.triplet_margin`` 0 -> softplus) on the pooled
feature before the BN neck; Adam (``lr``, ``weight_decay``); per-epoch WarmupMultiStep schedule (factor
``warmup_factor -> 1`` linearly over ``warmup_epochs``, x ``gamma`` at each milestone); P x K batches
(``batch_size`` / ``num_instances``) from ``IdentityBatchSampler``; no random erasing. With
``adapt_target_bn`` every iteration also forwards a random target-train batch in train mode (no grad, no
loss) so the BN running statistics see the target domain.

Evaluation: source query/gallery every ``eval_every`` epochs (and after the last). ``source_checkpoint``:
``final`` (default) -- logged only, no model selection: ``model.pt`` holds the final weights;
``best_source`` (released) -- ``model.pt`` holds the weights of the evaluated epoch with the highest SOURCE
test mAP (source labels: a legitimate selection; metrics ``selected_epoch``, ``selected_source_mAP``).
After training the model handed on (``model.pt``) is also evaluated on the target query/gallery once, for
the report (``target_*`` metrics = the source-only baseline); it never influences training or selection.
``pretrain.sampler`` picks the source batches (``balanced`` P x K or ``released``) and ``pretrain.bn_group``
the BatchNorm groups (``nn.DataParallel`` of the released code).

Resume: after every epoch the full training state (model, optimiser, scheduler, AMP scaler, metrics
history, RNG states) is written to ``<work>/state.pt`` with ``<work>`` = ``$LF2_WORK_DIR`` or
``<out>.partial`` next to the output (local or s3://). A new call with the same config continues after the
last completed epoch. Every epoch seeds torch/NumPy/random with ``seed + epoch`` and the samplers with
``(seed, epoch)``, so an interrupted and resumed run ends with the same weights as an uninterrupted one
(bit-exact on CPU with ``data.num_workers`` and the number of torch threads fixed: float32 reductions
split by thread, e.g. 1 vs 2 threads differ by ~1e-5 in the weights after two steps). Where the data and
the output live (local or s3://) does not matter: ``tests/test_reproducibility.py``.

Outputs: ``out/model.pt`` (lf2 checkpoint, kind ``source``), ``out/metrics.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from .. import artifacts, storage
from ..checkpoint import TrainingState, fingerprint
from ..config import Config
from ..distributed import Dist, device_policy, setup
from ..errors import DataError
from ..training.pretrainer import Pretrainer, SourceData, evaluate, lr_factor  # noqa: F401
from .table import PRETRAIN

log = logging.getLogger(__name__)


def work_dir(out: str) -> str:
    """Where the resumable state lives while training (``lf2core.checkpoint.work_dir``)."""
    return TrainingState(out, PRETRAIN, "").work


def _config_key(cfg: Config, world_size: int = 1) -> str:
    """Fingerprint of everything that shapes the training trajectory (resume only with the same)."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("seed", "data", "model", "pretrain")}
    relevant["data"] = {k: v for k, v in relevant["data"].items() if k not in ("cache_dir",)}
    if world_size > 1 or cfg.distributed.per_image_seeds:  # another augmentation seeding / BN split
        relevant["world_size"] = int(world_size)
        relevant["per_image_seeds"] = True
    return fingerprint(relevant)


def _source_data(cfg: Config, data: str) -> SourceData:
    """The splits of a prepare-data output that pretraining uses; DataError for an unusable source."""
    from ..data.datasets import count_unlabelled, relabel
    from ..data.manifest import split

    manifest = artifacts.read_manifest(data)
    src_train = split(manifest, "source_train")
    if not src_train:
        raise DataError(f"{data}: the source train split is empty")
    n_unlabelled = count_unlabelled(src_train)
    if n_unlabelled:
        raise DataError(f"{data}: the source train split has {n_unlabelled} unlabelled image(s) (no identity); "
                        "source pretraining needs every source train image labelled")
    tgt_train = split(manifest, "target_train") if cfg.pretrain.adapt_target_bn else []
    if cfg.pretrain.adapt_target_bn and not tgt_train:
        log.warning("pretrain.adapt_target_bn: the target train split is empty; no target batches")
    return SourceData(src_train, relabel(src_train), tgt_train,
                      (split(manifest, "source_query"), split(manifest, "source_gallery")),
                      (split(manifest, "target_query"), split(manifest, "target_gallery")))


def pretrain_source(cfg: Config, data: str, out: str) -> dict[str, Any]:
    """Train the source model; write ``out/model.pt`` and ``out/metrics.json`` (per-epoch history: loss
    terms, learning rate and, on evaluation epochs, source ``mAP``/``R1``..); return final metrics.

    Started by torchrun (``WORLD_SIZE`` > 1, ``lf2core.distributed``): data parallel over the ranks, rank 0
    evaluates and writes, the other ranks return None (docs/distributed.md)."""
    d = setup(cfg, PRETRAIN)
    with d.guard("pretrain"):
        return _pretrain_source(cfg, data, out, d)


def _pretrain_source(cfg: Config, data: str, out: str, d: Dist) -> Optional[dict[str, Any]]:
    p = cfg.pretrain
    if p.batch_size % d.world_size:
        raise DataError(f"config key 'pretrain.batch_size': {p.batch_size} does not split over WORLD_SIZE="
                        f"{d.world_size} processes")
    src = _source_data(cfg, data)
    policy = device_policy(cfg, d)
    trainer = Pretrainer(cfg, src, policy, d)
    state = TrainingState(out, PRETRAIN, _config_key(cfg, d.world_size))
    t0 = time.time()
    trainer.train(state)
    if not d.main:
        d.barrier("pretrain output written by rank 0")
        return None
    final: dict[str, Any] = {"epochs": p.epochs, "num_source_ids": src.num_classes,
                             "train_seconds": time.time() - t0}
    if trainer.history:
        final.update({k: v for k, v in trainer.history[-1].items() if k != "epoch"})
    state_dict, sel_epoch, sel_map = trainer.selected_state()
    if p.source_checkpoint == "best_source":
        final["selected_epoch"] = sel_epoch
        if sel_map is not None:
            final["selected_source_mAP"] = sel_map
        if sel_epoch != p.epochs:
            trainer.model.load_state_dict(state_dict)  # the target baseline below is of the model handed on
        log.info("pretrain.source_checkpoint=best_source: epoch %d (source mAP %s) is passed on", sel_epoch,
                 "n/a" if sel_map is None else f"{sel_map:.1%}")
    tq, tg = src.target_test
    if tq and tg:  # report only: the source-only baseline on the target (no selection on it)
        r = evaluate(trainer.model, cfg, tq, tg, policy, "eval target")
        final.update({f"target_{k}": v for k, v in r.items()})
        log.info("source model on the target test split (report only): mAP %.1f%% R1 %.1f%%",
                 100 * r["mAP"], 100 * r["R1"])
    with storage.output_dir(out, PRETRAIN) as tmp:
        artifacts.write_source_model(tmp, state_dict, cfg, extra={
            "arch": cfg.model.arch, "num_classes": src.num_classes, "epochs": p.epochs,
            "metrics": {k: float(v) for k, v in final.items()}})
        artifacts.write_metrics(tmp, final, trainer.history)
    state.release()
    d.barrier("pretrain output written by rank 0")
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in final.items()}
