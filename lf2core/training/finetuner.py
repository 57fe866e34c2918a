"""One fine-tuning round on a ``MeanTeacher``: the epoch loop and the round (resume, epochs, history).

``Finetuner`` runs the iterations of an epoch with ``fast_step`` (default) or ``reference_step``;
``train_round`` runs the ``epochs_per_round`` epochs of a round from the round's pseudo labels, saving the
resumable state (``lf2core.checkpoint.TrainingState``) after every epoch and every ``checkpoint_every``
iterations. The stage ``lf2core.stages.finetune`` reads the inputs and writes the outputs around it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..checkpoint import TrainingState
from ..distributed import Dist, DistributedError
from ..models.teacher import MeanTeacher
from ..runtime import DevicePolicy
from .camera_proxy import CameraProxyMemory, CameraProxySettings, teacher_global_features
from .loaders import round_loaders
from .step import Batch, Criteria, StepResult, StepSettings, fast_step, global_step, make_optimizer, reference_step
from .step import teacher_tail

log = logging.getLogger(__name__)

SaveFn = Callable[[int, torch.optim.Optimizer, dict[str, float]], None]


class Finetuner:
    """Runs epochs of one round on a ``MeanTeacher`` (moved to the policy's device and memory format):
    ``fast_step`` (default; the policy's autocast on CUDA with ``amp``) or, with ``fast=False``,
    ``reference_step``."""

    def __init__(self, mt: MeanTeacher, settings: StepSettings, num_classes: int, lr: float, weight_decay: float,
                 policy: DevicePolicy, *, fast: bool = True, dist: Dist = Dist()) -> None:
        if dist.active and not fast:
            raise ValueError("finetune: the reference step (fast=False) runs in one process only")
        if dist.active and settings.fusion_loss_weight > 0:
            raise DistributedError(f"{dist.where()}: config key 'finetune.fusion_loss_weight' > 0 is not supported "
                                   "with WORLD_SIZE > 1 (run it in one process)")
        self.dist = dist
        self.mt = mt
        self.settings = settings
        self.crit = Criteria(num_classes, settings.label_smoothing)
        self.lr = lr
        self.weight_decay = weight_decay
        self.policy = policy
        self.fast = fast
        self.autocast_dtype = policy.step_autocast_dtype() if fast else None
        self.scaler = policy.step_scaler() if fast else None
        policy.model(mt)
        self.cam_proxy: Optional[CameraProxyMemory] = None  # finetune.camera_proxy_weight > 0 (start_round)

    def new_optimizer(self) -> torch.optim.Adam:
        """A fresh Adam (the released code builds one per epoch)."""
        return make_optimizer(self.mt, self.lr, self.weight_decay)

    def step(self, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], step: int,
             teacher_pass: bool = True, index: Optional[torch.Tensor] = None) -> StepResult:
        """One step; ``index`` [B]: the dataset index of each global-batch image (needed with a camera
        proxy memory)."""
        dev = self.policy.device
        batches = [(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)) for x, y in batches]
        cam = None
        if self.cam_proxy is not None:
            if index is None:
                raise ValueError("finetune: the camera proxy loss needs the dataset index of the global batch")
            cam = (self.cam_proxy, self.cam_proxy.ids(index))
        if self.fast:
            return fast_step(
                self.mt, optimizer, batches, step, self.crit, self.settings, channels_last=self.policy.channels_last,
                autocast_dtype=self.autocast_dtype, scaler=self.scaler, teacher_pass=teacher_pass,
                dist=self.dist if self.dist.active else None, cam_proxy=cam,
            )
        return reference_step(self.mt, optimizer, batches, step, self.crit, self.settings, cam_proxy=cam)

    def run_epoch(self, loaders: Sequence[DataLoader], optimizer: torch.optim.Optimizer, first_step: int, start: int,
                  iters: int, save_fn: Optional[SaveFn] = None, checkpoint_every: int = 0,
                  sums: Optional[dict[str, float]] = None, progress: Optional[Any] = None,
                  teacher_from: int = 0) -> dict[str, float]:
        """Iterations ``start..iters-1`` of an epoch (global step ``first_step + i``); returns the mean terms
        (``loss``, ``ce``, ``tri_*``, ``acc``, ``alpha``, ``data_seconds``, ``step_seconds``).

        ``sums``: running sums of the logged terms of iterations before ``start`` (resume).
        ``save_fn(next_iteration, optimizer, sums)`` every ``checkpoint_every`` iterations (> 0) inside the
        epoch. ``teacher_from``: first iteration that runs the teacher/Fuse forwards (``teacher_tail``).
        """
        sums = dict(sums or {})
        iterators = [iter(dl) for dl in loaders]
        for i in range(start, iters):
            t0 = time.perf_counter()
            batches, index = [], None
            for it in iterators:
                x, y, _, idx = next(it)
                batches.append((x, y))
                index = idx if index is None else index  # the global batch's
            t1 = time.perf_counter()
            kw: dict[str, Any] = {} if self.cam_proxy is None else {"index": index}
            if i >= teacher_from:
                res = self.step(optimizer, batches, first_step + i, **kw)
            else:
                res = self.step(optimizer, batches, first_step + i, teacher_pass=False, **kw)
            vals = {"loss": float(res.loss), "alpha": res.alpha}
            vals.update({k: float(v) for k, v in res.terms.items()})
            vals["data_seconds"] = t1 - t0
            vals["step_seconds"] = time.perf_counter() - t1
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(f"finetune: loss is {vals['loss']} at global step {first_step + i}")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{vals['loss']:.3f}", acc=f"{vals['acc']:.2f}")
            done = i + 1
            if save_fn is not None and done < iters and checkpoint_every > 0 and done % checkpoint_every == 0:
                save_fn(done, optimizer, sums)
        n = max(1, iters)
        means = {k: v / n for k, v in sums.items()}
        means["alpha"] = float(res.alpha) if iters > start else means.get("alpha", 0.0)
        return means


@dataclass
class Round:
    """What a round trains on: the target train samples (manifest order), the label arrays of the
    variant's label sets (outlier policy applied, global numbered 0..G-1) and G."""

    samples: list
    label_sets: list[np.ndarray]
    num_classes: int
    index: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Progress:
    """Where a (possibly resumed) round starts."""

    epoch: int = 0
    iteration: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    optimizer: Optional[torch.optim.Optimizer] = None


def start_round(cfg: Any, settings: StepSettings, rnd: Round, mt_fn: Callable[[], MeanTeacher], centroids: np.ndarray,
                state: TrainingState, policy: DevicePolicy, fast: bool,
                dist: Dist = Dist()) -> tuple[Finetuner, _Progress]:
    """The round's ``Finetuner`` and starting point: resumed from ``state`` when it holds this run's
    state (classifier size from the labels, weights and Adam from the state), else the model of
    ``mt_fn()`` with the classifier of student and teacher := ``centroids``. Data parallel: every rank
    loads the same state (``DistributedError`` if the ranks disagree on where to resume)."""
    f = cfg.finetune

    def build(mt: MeanTeacher, c: np.ndarray) -> Finetuner:
        mt.reset_classifier(torch.as_tensor(c))
        return Finetuner(mt, settings, rnd.num_classes, f.lr, f.weight_decay, policy, fast=fast, dist=dist)

    found: tuple[Finetuner, _Progress] | None = None
    resumed: Optional[dict[str, Any]] = None
    if state.exists():
        ft = build(mt_fn(), np.zeros((rnd.num_classes, centroids.shape[1]), np.float32))
        opt = ft.new_optimizer()
        info = state.load(ft.mt, opt)
        if info is not None:
            extra = resumed = info["extra"]
            rnd.history[:] = list(extra.get("history", []))
            found = ft, _Progress(info["epoch"], int(extra.get("iteration", 0)), dict(extra.get("sums", {})), opt)
    if found is None:
        found = build(mt_fn(), centroids), _Progress()
    dist.check_same((found[1].epoch, found[1].iteration), "the resume point (epoch, iteration) of the state")
    cam = CameraProxySettings.from_config(f)
    if cam.weight > 0:
        found[0].cam_proxy = _camera_proxies(cfg, rnd, found[0], cam, resumed)
    return found


def _camera_proxies(cfg: Any, rnd: Round, ft: Finetuner, cam: CameraProxySettings,
                    extra: Optional[dict[str, Any]]) -> CameraProxyMemory:
    """The round's camera proxy memory (``camera_proxy``) on the policy's device: from the resumed
    state's ``extra`` when given, else built from the teacher's global features (data parallel: every
    rank extracts its shard, rank 0 builds the proxies and sends them to every rank)."""
    labels = rnd.label_sets[0]
    camids = np.fromiter((s.camid for s in rnd.samples), dtype=np.int64, count=len(rnd.samples))
    dev, d = ft.policy.device, ft.dist
    if extra is not None:
        if "camera_proxy" not in extra:
            raise ValueError("finetune: the training state has no camera proxy memory")
        mem = CameraProxyMemory.build(labels, camids, None, cam, dim=ft.mt.student.out_channels)
        mem.load_state_dict(extra["camera_proxy"])
        return mem.to(dev)
    lo, hi = d.shard(len(rnd.samples))
    part = teacher_global_features(ft.mt, rnd.samples[lo:hi], cfg.data.height, cfg.data.width, cfg.eval.batch_size,
                                   dev, cfg.data.num_workers, cfg.amp)
    rows = d.gather_rows({"f": part})
    mem = CameraProxyMemory.build(labels, camids, rows["f"] if rows is not None else None, cam, dim=part.shape[1])
    mem.proxies = d.broadcast_object(mem.proxies)
    log.info("camera proxies: %d (global label, camera) pairs of %d labels, from the teacher's global features of "
             "%d images", mem.num_proxies, int(labels.max()) + 1, len(rnd.samples))
    return mem.to(dev)


def train_round(cfg: Any, settings: StepSettings, rnd: Round, ft: Finetuner, start: _Progress, state: TrainingState,
                *, checkpoint_every: int, teacher_tail_only: bool, progress: Callable[..., Any]) -> None:
    """Epochs ``start.epoch..epochs_per_round-1`` of the round (``rnd.history`` gets one row per epoch, the
    state is saved after each); ``progress(total=, initial=, desc=)`` makes a progress bar."""
    from ..data.transforms import train_transform

    f = cfg.finetune
    E, iters = f.epochs_per_round, f.iters_per_epoch
    tf = train_transform(cfg.data.height, cfg.data.width, random_erasing=f.random_erasing, erasing=f.erasing)
    tail = None
    if ft.fast and teacher_tail_only and settings.fusion_loss_weight == 0:
        tail = teacher_tail(ft.mt, len(rnd.label_sets))

    def save(epoch: int, iteration: int, optimizer: torch.optim.Optimizer, sums: dict[str, float]) -> None:
        if not ft.dist.main:  # every rank holds the same state (Finetuner): rank 0 writes it
            return
        more = {} if ft.cam_proxy is None else {"camera_proxy": ft.cam_proxy.state_dict()}
        state.save(ft.mt, optimizer, None, epoch, iteration=iteration, sums=sums, history=rnd.history,
                   num_classes=rnd.num_classes, **more)

    for epoch in range(start.epoch, E):
        teacher_from = 0 if tail is None else (iters if epoch < E - 1 else max(0, iters - tail))
        resumed_mid = start.optimizer is not None and epoch == start.epoch and start.iteration > 0
        optimizer = start.optimizer if resumed_mid else ft.new_optimizer()
        first = start.iteration if epoch == start.epoch else 0
        loaders = round_loaders(rnd.samples, rnd.label_sets, tf, f.batch_size, f.num_instances, iters, cfg.seed,
                                rnd.index, epoch, start=first, num_workers=cfg.data.num_workers, sampler=f.sampler,
                                shard=(ft.dist.rank, ft.dist.world_size))
        bar = progress(total=iters, initial=first, desc=f"finetune r{rnd.index} e{epoch + 1}/{E}")
        t0 = time.time()
        metrics = ft.run_epoch(
            loaders, optimizer, global_step(rnd.index, epoch, 0, E, iters), first, iters,
            save_fn=lambda it, o, s, e=epoch: save(e, it, o, s), checkpoint_every=checkpoint_every,
            sums=start.sums if epoch == start.epoch else None, progress=bar, teacher_from=teacher_from,
        )
        bar.close()
        metrics["epoch_seconds"] = time.time() - t0
        rnd.history.append({"epoch": epoch + 1, **metrics})
        log.info(
            "round %d epoch %d/%d loss %.3f (ce %.3f tri %.3f) acc %.3f, %.2fs/it (data %.2fs)", rnd.index,
            epoch + 1, E, metrics["loss"], metrics["ce"], metrics["tri_global"], metrics["acc"],
            metrics["step_seconds"] + metrics["data_seconds"], metrics["data_seconds"],
        )
        start = _Progress(start.epoch)
        save(epoch + 1, 0, optimizer, {})
