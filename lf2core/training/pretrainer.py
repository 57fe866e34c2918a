"""Source pretraining (the recipe is in ``lf2core.stages.pretrain``): model, optimiser and schedule, the
seeded loaders of an epoch, one epoch, and the resumable epoch loop."""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from ..checkpoint import TrainingState
from ..distributed import Dist
from ..features import evaluate_samples, progress_enabled
from ..losses import CrossEntropyLabelSmooth, triplet_loss
from ..models import SourceModel
from ..runtime import DevicePolicy, seed_everything
from .step import bn_groups, ghost_batchnorm

log = logging.getLogger(__name__)

def lr_factor(epoch: int, warmup_epochs: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """WarmupMultiStepLR factor for (0-based) ``epoch``: linear warmup from ``warmup_factor``, then steps."""
    f = 1.0
    if epoch < warmup_epochs:
        a = epoch / warmup_epochs
        f = warmup_factor * (1 - a) + a
    return f * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def build(cfg: Any, num_classes: int, policy: DevicePolicy) -> tuple[SourceModel, torch.optim.Adam, Any]:
    """Model, Adam and the warmup multistep scheduler, freshly initialised from ``cfg.seed``."""
    p = cfg.pretrain
    seed_everything(cfg.seed)
    model = policy.model(SourceModel(cfg.model.arch, num_classes, cfg.model.weights, cfg.model.last_stride))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    milestones = list(p.milestones)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, p.warmup_epochs, p.warmup_factor, milestones, p.gamma)
    )
    return model, optimizer, scheduler


def source_loader(cfg: Any, samples: list, labels: np.ndarray, epoch: int,
                  shard: Optional[tuple[int, int]] = None) -> DataLoader:
    """The source batches of ``epoch``: ``pretrain.sampler`` balanced (``data.loaders.train_loader``) or
    released (``data.samplers.ReleasedBatchSampler``, the same loader otherwise).

    ``shard=(rank, world_size)`` (data parallel, or ``distributed.per_image_seeds`` with (0, 1)): the same
    batches of indices, every image's augmentation seeded by (seed, epoch, batch, position)
    (``training.loaders.SeededBatchSampler``), and this rank's contiguous slice of each batch."""
    from ..data.loaders import ImageDataset, train_loader
    from ..data.samplers import RankSlice, ReleasedBatchSampler, batch_sampler
    from ..data.transforms import train_transform
    from .loaders import SeededBatchSampler, SeededDataset

    p = cfg.pretrain
    tf = train_transform(cfg.data.height, cfg.data.width, random_erasing=0.0)
    if shard is not None:
        camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
        base = batch_sampler(p.sampler, labels, camids, p.batch_size, p.num_instances, p.iters_per_epoch, cfg.seed)
        base.set_epoch(epoch)
        seeded: Any = SeededBatchSampler(base, (cfg.seed, epoch, 31))
        if shard[1] > 1:
            seeded = RankSlice(seeded, *shard)
        return DataLoader(SeededDataset(ImageDataset(samples, tf, labels)), batch_sampler=seeded,
                          num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    if p.sampler == "released":
        camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
        sampler = ReleasedBatchSampler(labels, camids, p.batch_size, p.num_instances, p.iters_per_epoch, cfg.seed)
        gen = torch.Generator()
        gen.manual_seed(int(cfg.seed))
        nw = cfg.data.num_workers
        loader = DataLoader(ImageDataset(samples, tf, labels), batch_sampler=sampler, generator=gen, num_workers=nw,
                            pin_memory=torch.cuda.is_available(), persistent_workers=nw > 0)
    else:
        loader = train_loader(samples, labels, tf, p.batch_size, p.num_instances, p.iters_per_epoch, seed=cfg.seed,
                              num_workers=cfg.data.num_workers)
    loader.batch_sampler.set_epoch(epoch)
    loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # worker seeds (num_workers > 0)
    return loader


def target_loader(cfg: Any, samples: list, epoch: int, shard: Optional[tuple[int, int]] = None) -> DataLoader:
    """Random target batches (no identity balancing, as the released code), ``iters_per_epoch`` of them;
    ``shard`` as ``source_loader``."""
    from torch.utils.data import BatchSampler

    from ..data.loaders import ImageDataset
    from ..data.samplers import RankSlice
    from ..data.transforms import train_transform
    from .loaders import SeededBatchSampler, SeededDataset

    p = cfg.pretrain
    g = torch.Generator()
    g.manual_seed(cfg.seed * 1_000_003 + 500_009 + epoch)
    ds = ImageDataset(samples, train_transform(cfg.data.height, cfg.data.width, random_erasing=0.0))
    bs = min(p.batch_size, len(samples))
    sampler = RandomSampler(ds, replacement=False, num_samples=p.iters_per_epoch * bs, generator=g)
    if shard is not None:
        seeded: Any = SeededBatchSampler(BatchSampler(sampler, bs, drop_last=True), (cfg.seed, epoch, 37))
        if shard[1] > 1:
            seeded = RankSlice(seeded, *shard)
        return DataLoader(SeededDataset(ds), batch_sampler=seeded, num_workers=cfg.data.num_workers,
                          pin_memory=torch.cuda.is_available())
    return DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
                      generator=g, pin_memory=torch.cuda.is_available())


def evaluate(model: SourceModel, cfg: Any, query: list, gallery: list, policy: DevicePolicy, desc: str) -> dict:
    """mAP / R1 / R5 / R10 / mINP of ``model`` (eval mode for the call) on query/gallery samples."""
    was = model.training
    model.eval()
    try:
        return evaluate_samples(
            model, query, gallery, cfg.data.height, cfg.data.width, cfg.eval.batch_size, policy.device,
            num_workers=cfg.data.num_workers, amp=cfg.amp, flip=cfg.eval.flip, desc=desc,
        )
    finally:
        model.train(was)


@dataclass
class SourceData:
    """The splits pretraining uses: source train (+ labels 0..n-1), target train (adapt_target_bn) and
    the source / target query and gallery."""

    train: list
    labels: np.ndarray
    target_train: list
    source_test: tuple[list, list]
    target_test: tuple[list, list]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


@dataclass
class Pretrainer:
    cfg: Any
    data: SourceData
    policy: DevicePolicy
    #: data parallel (``lf2core.distributed``): this rank; rank 0 evaluates and saves
    dist: Dist = field(default_factory=Dist)
    model: SourceModel = field(init=False)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: ``pretrain.source_checkpoint = best_source``: {"epoch", "mAP", "state_dict" (CPU)} of the evaluated
    #: epoch with the highest SOURCE test mAP so far (the first one on ties), else None
    best: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        p = self.cfg.pretrain
        self.model, self.optimizer, self.scheduler = build(self.cfg, self.data.num_classes, self.policy)
        self.scaler = self.policy.grad_scaler()
        self.ce = CrossEntropyLabelSmooth(self.data.num_classes, p.label_smoothing)
        self.tri = triplet_loss(p.triplet_margin)
        per_image = self.dist.active or bool(self.cfg.distributed.per_image_seeds)
        self.shard = (self.dist.rank, self.dist.world_size) if per_image else None

    def resume(self, state: TrainingState) -> int:
        """Load a matching training state (returns the epochs it completed) or start afresh (0)."""
        if not state.exists():
            return 0
        info = state.load(self.model, self.optimizer, self.scheduler)
        if info is None:  # the objects may hold a foreign state: rebuild them from the seed
            self.model, self.optimizer, self.scheduler = build(self.cfg, self.data.num_classes, self.policy)
            return 0
        self.dist.check_same(info["epoch"], "the resume epoch of the state")
        self.history = list(info["extra"].get("history", []))
        self.best = info["extra"].get("best_source") or None
        if info["extra"].get("scaler"):
            self.scaler.load_state_dict(info["extra"]["scaler"])
        return info["epoch"]

    def _bn(self, rows: int, group: int) -> Any:
        """BN of a forward of ``rows`` images: over all ranks (``distributed.sync_bn``), else per rank
        with ``pretrain.bn_group`` groups."""
        if self.dist.active and self.dist.sync_bn:
            return ghost_batchnorm([self.model], [rows], sync=self.dist)
        return bn_groups([self.model], rows, group)

    def step(self, x: torch.Tensor, y: torch.Tensor, target: Optional[Iterator]) -> dict[str, float]:
        """One iteration: CE + triplet on a source batch (+ a no-grad, no-loss forward of the next batch of
        ``target``), Adam step. Data parallel: ``x``, ``y`` and the target batch are this rank's slices
        (per-rank BN); the loss is on the gathered global batch, gradients are summed over ranks, BN
        buffers are rank 0's."""
        pol, group, d = self.policy, self.cfg.pretrain.bn_group, self.dist
        x, y = pol.batch(x), y.to(pol.device, non_blocking=True)
        with pol.autocast(), self._bn(int(x.shape[0]), group):
            feat, logits = self.model(x)
        if d.active:
            feat, logits, y = d.all_gather_cat(feat), d.all_gather_cat(logits), d.all_gather_cat(y)
        loss_ce = self.ce(logits.float(), y)
        loss_tri = self.tri(feat.float(), y)
        loss = loss_ce + loss_tri
        if target is not None:  # BN statistics see the target domain (no grad, no loss)
            xt = pol.batch(next(target)[0])
            with torch.no_grad(), pol.autocast(), self._bn(int(xt.shape[0]), group):
                self.model(xt)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if d.active:
            d.sum_gradients(q for g in self.optimizer.param_groups for q in g["params"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        d.broadcast_buffers([self.model])
        return {"loss": loss.item(), "loss_ce": loss_ce.item(), "loss_tri": loss_tri.item(),
                "acc": (logits.argmax(1) == y).float().mean().item()}

    def epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (seeded by ``seed + epoch``); returns its mean terms, ``lr`` and ``epoch_seconds``."""
        cfg, p = self.cfg, self.cfg.pretrain
        seed_everything(cfg.seed + epoch)
        src_iter = iter(source_loader(cfg, self.data.train, self.data.labels, epoch, self.shard))
        tgt_iter = (iter(target_loader(cfg, self.data.target_train, epoch, self.shard)) if self.data.target_train
                    else None)
        lr = self.optimizer.param_groups[0]["lr"]
        sums = {"loss": 0.0, "loss_ce": 0.0, "loss_tri": 0.0, "acc": 0.0}
        bar = tqdm(range(p.iters_per_epoch), desc=f"pretrain {epoch + 1}/{p.epochs}", unit="it",
                   disable=not progress_enabled(), leave=False)
        te = time.time()
        for _ in bar:
            x, y, _, _ = next(src_iter)
            vals = self.step(x, y, tgt_iter)
            for k, v in vals.items():
                sums[k] += v
            bar.set_postfix(loss=f"{vals['loss']:.3f}")
        self.scheduler.step()
        metrics = {k: v / p.iters_per_epoch for k, v in sums.items()}
        metrics["lr"] = lr
        metrics["epoch_seconds"] = time.time() - te
        return metrics

    def train(self, state: TrainingState) -> None:
        """Epochs after the resumed ones: source evaluation every ``eval_every`` epochs and after the last
        (logged only), the state saved after each epoch."""
        p = self.cfg.pretrain
        start = self.resume(state)
        log.info(
            "pretrain %s on %d source images / %d ids (device %s, amp %s, %d torch threads), epochs %d..%d x %d "
            "iters", self.cfg.model.arch, len(self.data.train), self.data.num_classes, self.policy.device,
            self.policy.amp, torch.get_num_threads(), start, p.epochs, p.iters_per_epoch,
        )
        self.model.train()
        for epoch in range(start, p.epochs):
            metrics = self.epoch(epoch)
            q, g = self.data.source_test
            if not self.dist.main:  # rank 0 evaluates and saves while the others wait
                self.dist.barrier(f"epoch {epoch + 1} evaluated and saved by rank 0")
                continue
            if q and g and ((p.eval_every > 0 and (epoch + 1) % p.eval_every == 0) or epoch + 1 == p.epochs):
                r = evaluate(self.model, self.cfg, q, g, self.policy, "eval source")
                metrics.update({f"source_{k}": v for k, v in r.items()})
                if p.source_checkpoint == "best_source":
                    self.consider_best(epoch + 1, float(r["mAP"]))
            self.history.append({"epoch": epoch + 1, **metrics})
            log.info(
                "epoch %d/%d loss %.3f (ce %.3f tri %.3f) acc %.3f lr %.2e%s", epoch + 1, p.epochs, metrics["loss"],
                metrics["loss_ce"], metrics["loss_tri"], metrics["acc"], metrics["lr"],
                f" source mAP {metrics['source_mAP']:.1%} R1 {metrics['source_R1']:.1%}"
                if "source_mAP" in metrics else "",
            )
            state.save(self.model, self.optimizer, self.scheduler, epoch + 1, history=self.history,
                       scaler=self.scaler.state_dict() if self.policy.amp else {}, best_source=self.best or {})
            self.dist.barrier(f"epoch {epoch + 1} evaluated and saved by rank 0")

    def consider_best(self, epoch: int, source_map: float) -> bool:
        """Keep the current weights as ``best`` when ``source_map`` beats the best so far (strictly, as the
        released code: an equal mAP keeps the earlier epoch). Returns whether they were kept."""
        if self.best is not None and not source_map > self.best["mAP"]:
            return False
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
        self.best = {"epoch": int(epoch), "mAP": float(source_map), "state_dict": state}
        return True

    def selected_state(self) -> tuple[dict[str, torch.Tensor], int, Optional[float]]:
        """The weights handed to stage 2 by ``pretrain.source_checkpoint``: (state dict on the CPU, its
        epoch, its source mAP or None). ``best_source`` without any source evaluation falls back to the
        final weights (logged)."""
        p = self.cfg.pretrain
        if p.source_checkpoint == "best_source":
            if self.best is not None:
                return dict(self.best["state_dict"]), int(self.best["epoch"]), float(self.best["mAP"])
            log.warning("pretrain.source_checkpoint=best_source: no source evaluation ran (empty source test "
                        "split?); passing the final weights")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        last = self.history[-1] if self.history else {}
        return state, int(last.get("epoch", p.epochs)), last.get("source_mAP")
