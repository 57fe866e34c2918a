"""Stage pretrain-source: supervised training of ``SourceModel`` on the source train split.

As the released code (MMT/MEB-Net stage 1): label-smoothed CE (``pretrain.label_smoothing``) on the
classifier logits + batch-hard soft triplet (``pretrain.triplet_margin`` 0 -> softplus) on the pooled
feature before the BN neck; Adam (``lr``, ``weight_decay``); per-epoch WarmupMultiStep schedule (factor
``warmup_factor -> 1`` linearly over ``warmup_epochs``, x ``gamma`` at each milestone); P x K batches
(``batch_size`` / ``num_instances``) from ``IdentityBatchSampler``; no random erasing. With
``adapt_target_bn`` every iteration also forwards a random target-train batch in train mode (no grad, no
loss) so the BN running statistics see the target domain.

Evaluation: source query/gallery every ``eval_every`` epochs (and after the last) -- logged only, no
model selection: ``model.pt`` holds the final weights. After training the final model is also evaluated
on the target query/gallery once, for the report (``target_*`` metrics = the source-only baseline); it
never influences training.

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

import bisect
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from .. import checkpoint, storage
from ..checkpoint import load_state, save_checkpoint, save_state
from ..config import Config
from ..errors import CheckpointError, DataError
from ..features import autocast_context, evaluate_samples, progress_enabled
from ..losses import CrossEntropyLabelSmooth, triplet_loss
from ..models import SourceModel
from ..runtime import seed_everything, select_device

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


def _noop(metrics: dict[str, float], step: int) -> None:
    return None


def lr_factor(epoch: int, warmup_epochs: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """WarmupMultiStepLR factor for (0-based) ``epoch``: linear warmup from ``warmup_factor``, then steps."""
    f = 1.0
    if epoch < warmup_epochs:
        a = epoch / warmup_epochs
        f = warmup_factor * (1 - a) + a
    return f * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def work_dir(out: str) -> str:
    """Where the resumable state lives while training (``lf2core.checkpoint.work_dir``)."""
    return checkpoint.work_dir(out, "pretrain")


def _build(cfg: Config, num_classes: int, device: torch.device):
    """Model, Adam and the warmup multistep scheduler, freshly initialised from ``cfg.seed``."""
    p = cfg.pretrain
    seed_everything(cfg.seed)
    model = SourceModel(cfg.model.arch, num_classes, cfg.model.weights, cfg.model.last_stride).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    milestones = list(p.milestones)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, p.warmup_epochs, p.warmup_factor, milestones, p.gamma)
    )
    return model, optimizer, scheduler


def _config_key(cfg: Config) -> str:
    """Fingerprint of everything that shapes the training trajectory (resume only with the same)."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("seed", "data", "model", "pretrain")}
    relevant["data"] = {k: v for k, v in relevant["data"].items() if k not in ("cache_dir",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_loader(cfg: Config, samples: list, labels: np.ndarray, epoch: int) -> DataLoader:
    from ..data.loaders import train_loader
    from ..data.transforms import train_transform

    p = cfg.pretrain
    loader = train_loader(
        samples, labels, train_transform(cfg.data.height, cfg.data.width, random_erasing=0.0),
        p.batch_size, p.num_instances, p.iters_per_epoch, seed=cfg.seed, num_workers=cfg.data.num_workers,
    )
    loader.batch_sampler.set_epoch(epoch)
    loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # worker seeds (num_workers > 0)
    return loader


def _target_loader(cfg: Config, samples: list, epoch: int) -> DataLoader:
    """Random target batches (no identity balancing, as the released code), ``iters_per_epoch`` of them."""
    from ..data.loaders import ImageDataset
    from ..data.transforms import train_transform

    p = cfg.pretrain
    g = torch.Generator()
    g.manual_seed(cfg.seed * 1_000_003 + 500_009 + epoch)
    ds = ImageDataset(samples, train_transform(cfg.data.height, cfg.data.width, random_erasing=0.0))
    bs = min(p.batch_size, len(samples))
    sampler = RandomSampler(ds, replacement=False, num_samples=p.iters_per_epoch * bs, generator=g)
    return DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
                      generator=g, pin_memory=torch.cuda.is_available())


def _evaluate(model: SourceModel, cfg: Config, query: list, gallery: list, device: torch.device, desc: str) -> dict:
    was = model.training
    model.eval()
    try:
        return evaluate_samples(
            model, query, gallery, cfg.data.height, cfg.data.width, cfg.eval.batch_size, device,
            num_workers=cfg.data.num_workers, amp=cfg.amp, flip=cfg.eval.flip, desc=desc,
        )
    finally:
        model.train(was)


def pretrain_source(
    cfg: Config,
    data: str,
    out: str,
    on_metrics: Optional[MetricsCallback] = None,
) -> dict[str, Any]:
    """Train the source model; write ``out/model.pt`` and ``out/metrics.json``; return final metrics.

    ``on_metrics(metrics, step)`` is called after every epoch (step = epochs completed) with the loss,
    learning rate and, on evaluation epochs, source ``mAP``/``R1``..; the resumable state is saved before
    it is called, so an exception raised there interrupts the run cleanly (used by the resume test).
    """
    from ..data.datasets import count_unlabelled, relabel
    from ..data.manifest import read_manifest, split

    on_metrics = on_metrics or _noop
    p = cfg.pretrain
    manifest = read_manifest(data)
    src_train = split(manifest, "source_train")
    if not src_train:
        raise DataError(f"{data}: the source train split is empty")
    n_unlabelled = count_unlabelled(src_train)
    if n_unlabelled:
        raise DataError(f"{data}: the source train split has {n_unlabelled} unlabelled image(s) (no identity); "
                        "source pretraining needs every source train image labelled")
    labels = relabel(src_train)
    num_classes = int(labels.max()) + 1
    tgt_train = split(manifest, "target_train") if p.adapt_target_bn else []
    if p.adapt_target_bn and not tgt_train:
        log.warning("pretrain.adapt_target_bn: the target train split is empty; no target batches")
    src_q, src_g = split(manifest, "source_query"), split(manifest, "source_gallery")
    tgt_q, tgt_g = split(manifest, "target_query"), split(manifest, "target_gallery")

    device = select_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    model, optimizer, scheduler = _build(cfg, num_classes, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ce = CrossEntropyLabelSmooth(num_classes, p.label_smoothing)
    tri = triplet_loss(p.triplet_margin)

    work = work_dir(out)
    state_uri = storage.join(work, checkpoint.STATE_FILE)
    key = _config_key(cfg)
    start_epoch, history = 0, []
    if storage.exists(state_uri):
        try:
            info = load_state(state_uri, model, optimizer, scheduler)
        except CheckpointError as e:
            log.warning("ignoring unusable training state (%s); starting from scratch", e)
            info = None
        if info is not None and info["extra"].get("config_key") == key:
            start_epoch = info["epoch"]
            history = list(info["extra"].get("history", []))
            if info["extra"].get("scaler"):
                scaler.load_state_dict(info["extra"]["scaler"])
            log.info("resuming source pretraining from %s after epoch %d", state_uri, start_epoch)
        else:
            if info is not None:
                log.warning("training state %s is for another config; starting from scratch", state_uri)
            model, optimizer, scheduler = _build(cfg, num_classes, device)
    log.info(
        "pretrain %s on %d source images / %d ids (device %s, amp %s, %d torch threads), epochs %d..%d x %d iters",
        cfg.model.arch, len(src_train), num_classes, device, use_amp, torch.get_num_threads(), start_epoch, p.epochs,
        p.iters_per_epoch,
    )

    t0 = time.time()
    model.train()
    for epoch in range(start_epoch, p.epochs):
        seed_everything(cfg.seed + epoch)
        src_iter = iter(_source_loader(cfg, src_train, labels, epoch))
        tgt_iter = iter(_target_loader(cfg, tgt_train, epoch)) if tgt_train else None
        lr = optimizer.param_groups[0]["lr"]
        sums = {"loss": 0.0, "loss_ce": 0.0, "loss_tri": 0.0, "acc": 0.0}
        bar = tqdm(range(p.iters_per_epoch), desc=f"pretrain {epoch + 1}/{p.epochs}", unit="it",
                   disable=not progress_enabled(), leave=False)
        te = time.time()
        for _ in bar:
            x, y, _, _ = next(src_iter)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, use_amp):
                feat, logits = model(x)
            loss_ce = ce(logits.float(), y)
            loss_tri = tri(feat.float(), y)
            loss = loss_ce + loss_tri
            if tgt_iter is not None:  # BN statistics see the target domain (no grad, no loss)
                xt = next(tgt_iter)[0].to(device, non_blocking=True)
                if device.type == "cuda":
                    xt = xt.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast_context(device, use_amp):
                    model(xt)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sums["loss"] += loss.item()
            sums["loss_ce"] += loss_ce.item()
            sums["loss_tri"] += loss_tri.item()
            sums["acc"] += (logits.argmax(1) == y).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        scheduler.step()
        n = p.iters_per_epoch
        metrics = {k: v / n for k, v in sums.items()}
        metrics["lr"] = lr
        metrics["epoch_seconds"] = time.time() - te
        last = epoch + 1 == p.epochs
        if src_q and src_g and ((p.eval_every > 0 and (epoch + 1) % p.eval_every == 0) or last):
            r = _evaluate(model, cfg, src_q, src_g, device, "eval source")
            metrics.update({f"source_{k}": v for k, v in r.items()})
        history.append({"epoch": epoch + 1, **metrics})
        log.info(
            "epoch %d/%d loss %.3f (ce %.3f tri %.3f) acc %.3f lr %.2e%s", epoch + 1, p.epochs, metrics["loss"],
            metrics["loss_ce"], metrics["loss_tri"], metrics["acc"], lr,
            f" source mAP {metrics['source_mAP']:.1%} R1 {metrics['source_R1']:.1%}" if "source_mAP" in metrics else "",
        )
        save_state(state_uri, model, optimizer, scheduler, epoch + 1,
                   extra={"config_key": key, "history": history,
                          "scaler": scaler.state_dict() if use_amp else {}})
        on_metrics(metrics, epoch + 1)
    train_seconds = time.time() - t0

    final: dict[str, Any] = {"epochs": p.epochs, "num_source_ids": num_classes, "train_seconds": train_seconds}
    if history:
        final.update({k: v for k, v in history[-1].items() if k != "epoch"})
    if tgt_q and tgt_g:  # report only: the source-only baseline on the target (no selection on it)
        r = _evaluate(model, cfg, tgt_q, tgt_g, device, "eval target")
        final.update({f"target_{k}": v for k, v in r.items()})
        log.info("source model on the target test split (report only): mAP %.1f%% R1 %.1f%%",
                 100 * r["mAP"], 100 * r["R1"])
    with storage.output_dir(out, "pretrain-source") as tmp:
        model_cpu_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_checkpoint(str(Path(tmp) / "model.pt"), model_cpu_state, "source", cfg,
                        extra={"arch": cfg.model.arch, "num_classes": num_classes, "epochs": p.epochs,
                               "metrics": {k: float(v) for k, v in final.items()}})
        (Path(tmp) / "metrics.json").write_text(
            json.dumps({"final": final, "history": history}, indent=2, sort_keys=True, default=float) + "\n"
        )
    checkpoint.release_work_dir(work)
    on_metrics({k: float(v) for k, v in final.items() if isinstance(v, (int, float))}, p.epochs)
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in final.items()}
