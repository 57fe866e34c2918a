"""LF2 stage-2 training logic: the mean-teacher optimisation step (a reference and a fast version with
the same math), the round's deterministic loaders, the optimiser, and the epoch loop.

One optimisation step of the released recipe (``SingelmeanTrainer``), per iteration ``i`` of epoch ``e``
of round ``r`` (global step ``t = (r * epochs_per_round + e) * iters_per_epoch + i``):

- three P x K batches ``(x_g, y_g)``, ``(x_u, y_u)``, ``(x_l, y_l)`` drawn with the global, upper and lower
  pseudo labels (``mt_global``: the global batch only);
- each batch goes through the student, the teacher (TRAIN mode: the teacher's BN running statistics are
  updated by its own forwards) and the Fuse (teacher map x student part attention; TRAIN mode too);
- ``loss = CE_ls(logits(x_g), y_g) + Tri(f0(x_g), y_g) + w * Tri(f1(x_u), y_u) + w * Tri(f2(x_l), y_l)``
  with ``w = finetune.part_loss_weight`` (0.5), soft triplets (margin 0) on post-BN features;
  ``finetune.fusion_loss_weight = v > 0`` adds ``v * (Tri(phi0(x_g), y_g) + w * Tri(phi1(x_u), y_u)
  + w * Tri(phi2(x_l), y_l))`` on the fusion features, so the student's channel attention (and the Fuse
  BN weights) get a gradient -- the released code never trains them;
- Adam step (student parameters + Fuse BN weights), then the EMA of the teacher's PARAMETERS with
  ``alpha_t = min(1 - 1/(t+1), ema_alpha)``.

``reference_step`` is that recipe written plainly (three forwards through student, teacher and Fuse, as
the released loop). ``fast_step`` computes the same numbers with less work:

- the three batches go through the student in ONE forward of the concatenated batch, and through the
  teacher and the Fuse in one no-grad forward each, under ``ghost_batchnorm``: every BatchNorm layer
  normalises each sub-batch with that sub-batch's own statistics and updates its running statistics once
  per sub-batch, in order -- exactly what three separate train-mode forwards do;
- the Fuse runs without autograd when its outputs are not in the loss (the paper recipe);
- optional channels_last memory format and (CUDA) autocast.

``tests/test_finetune.py`` checks that both produce the same loss, gradients, updated parameters, teacher
and BN buffers (to ~1e-5) on the same weights and inputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .losses import CrossEntropyLabelSmooth, SoftTripletLoss
from .models.lf2 import LF2Output
from .models.teacher import MeanTeacher

log = logging.getLogger(__name__)

LABEL_SETS = ("global", "upper", "lower")
VARIANTS = ("lf2", "mt_global")


# ------------------------------------------------------------------------------------------ settings
@dataclass
class StepSettings:
    """Everything one optimisation step needs besides weights and data (from ``cfg.finetune``)."""

    variant: str = "lf2"  # lf2 | mt_global (global label set only)
    part_loss_weight: float = 0.5
    fusion_loss_weight: float = 0.0
    label_smoothing: float = 0.1
    ema_alpha: float = 0.999

    @classmethod
    def from_config(cls, finetune_cfg: Any) -> "StepSettings":
        if finetune_cfg.variant not in VARIANTS:
            raise ValueError(f"config key 'finetune.variant': {finetune_cfg.variant!r} is not one of {list(VARIANTS)}")
        return cls(
            variant=finetune_cfg.variant,
            part_loss_weight=float(finetune_cfg.part_loss_weight),
            fusion_loss_weight=float(finetune_cfg.fusion_loss_weight),
            label_smoothing=float(finetune_cfg.label_smoothing),
            ema_alpha=float(finetune_cfg.ema_alpha),
        )

    def num_batches(self, num_parts: int) -> int:
        """Batches per step: 1 + K for LF2, 1 for ``mt_global``."""
        return 1 if self.variant == "mt_global" else 1 + num_parts


class Criteria:
    """The losses of one round: label-smoothed CE over ``num_classes`` clusters and a soft triplet."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.1) -> None:
        self.ce = CrossEntropyLabelSmooth(num_classes, label_smoothing)
        self.tri = SoftTripletLoss(margin=0.0)


Batch = tuple[torch.Tensor, torch.Tensor]  # (images [B,3,H,W] float, labels [B] int64)


# ------------------------------------------------------------------------------------------ ghost batch norm
def _ghost_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over ``x`` [sum(sizes), C, ...] as separate train-mode calls on each sub-batch."""
    sizes = self._lf2_ghost_sizes
    if not (self.training and self.track_running_stats) or x.shape[0] != sum(sizes) or len(sizes) == 1:
        return self._lf2_plain_forward(x)
    self._check_input_dim(x)
    outs = []
    for chunk in torch.split(x, sizes, dim=0):
        # what nn.BatchNorm.forward does in train mode, once per sub-batch: count, then normalise with the
        # sub-batch statistics and move the running statistics by one momentum step
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        outs.append(
            F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)
        )
    return torch.cat(outs, dim=0)


@contextlib.contextmanager
def ghost_batchnorm(modules: Sequence[nn.Module], sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, every train-mode BatchNorm layer of ``modules`` that receives a batch of
    ``sum(sizes)`` rows treats it as ``len(sizes)`` independent sub-batches (``torch.split`` sizes): the
    output of each sub-batch is normalised with its own batch statistics and the running statistics are
    updated once per sub-batch, in order -- the same outputs and buffers as separate forwards of the
    sub-batches. Inputs of another batch size, eval-mode layers and layers without running statistics are
    left to the normal forward.
    """
    sizes = [int(s) for s in sizes]
    patched: list[nn.Module] = []
    try:
        for root in modules:
            for m in root.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(m, "_lf2_ghost_sizes"):
                    m._lf2_ghost_sizes = sizes
                    m._lf2_plain_forward = m.forward
                    m.forward = types.MethodType(_ghost_bn_forward, m)
                    patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
            del m._lf2_plain_forward
            del m._lf2_ghost_sizes


def _split_output(out: LF2Output, sizes: Sequence[int]) -> list[LF2Output]:
    """Cut a train-mode ``LF2Output`` of the concatenated batch into one per sub-batch (views)."""
    pieces = [
        torch.split(out.feature_map, sizes),
        torch.split(out.global_feat, sizes),
        list(zip(*[torch.split(t, sizes) for t in out.part_feats])),
        list(zip(*[torch.split(t, sizes) for t in out.part_attention])) or [()] * len(sizes),
        torch.split(out.logits, sizes),
    ]
    return [
        LF2Output(pieces[0][k], pieces[1][k], list(pieces[2][k]), list(pieces[3][k]), pieces[4][k])
        for k in range(len(sizes))
    ]


# ------------------------------------------------------------------------------------------ loss
def lf2_loss(
    student: Sequence[LF2Output],
    fusion: Optional[Sequence[Sequence[torch.Tensor]]],
    labels: Sequence[torch.Tensor],
    crit: Criteria,
    settings: StepSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LF2 loss of one step.

    Args:
        student: per batch k (0 = global, j = part j) the student's ``LF2Output`` of that batch.
        fusion: per batch k the K+1 fusion features [B,C] (needed only when ``fusion_loss_weight > 0``).
        labels: per batch k its pseudo labels [B] (int64).
    Returns:
        (scalar loss, detached terms ``ce``, ``tri_global``, ``tri_part{j}``, ``tri_fusion``, ``acc``).
    """
    w = settings.part_loss_weight
    out0, y0 = student[0], labels[0]
    ce = crit.ce(out0.logits, y0)
    tri0 = crit.tri(out0.global_feat, y0)
    loss = ce + tri0
    terms: dict[str, torch.Tensor] = {"ce": ce.detach(), "tri_global": tri0.detach()}
    for j in range(1, len(student)):
        tj = crit.tri(student[j].part_feats[j - 1], labels[j])
        loss = loss + w * tj
        terms[f"tri_part{j}"] = tj.detach()
    if settings.fusion_loss_weight > 0:
        if fusion is None:
            raise ValueError("fusion_loss_weight > 0 needs the fusion features")
        tf = crit.tri(fusion[0][0], y0)
        for j in range(1, len(student)):
            tf = tf + w * crit.tri(fusion[j][j], labels[j])
        loss = loss + settings.fusion_loss_weight * tf
        terms["tri_fusion"] = tf.detach()
    terms["acc"] = (out0.logits.detach().argmax(1) == y0).float().mean()
    return loss, terms


# ------------------------------------------------------------------------------------------ steps
@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar
    terms: dict[str, torch.Tensor]
    alpha: float  # EMA coefficient used


def _optimise(
    mt: MeanTeacher, optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, settings: StepSettings,
    scaler: Optional[Any] = None,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return mt.update_teacher(step, settings.ema_alpha)


def reference_step(
    mt: MeanTeacher,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    step: int,
    crit: Criteria,
    settings: StepSettings,
) -> StepResult:
    """The released iteration, written plainly: every batch through student, teacher and Fuse (train
    mode, autograd on), the loss, one Adam step, the EMA update. The yardstick for ``fast_step``."""
    mt.train()
    student_out, fusion = [], []
    for x, _ in batches:
        s = mt.student(x)
        t = mt.teacher(x)
        fusion.append(mt.fuse(t.feature_map, s.part_attention))
        student_out.append(s)
    loss, terms = lf2_loss(student_out, fusion, [y for _, y in batches], crit, settings)
    alpha = _optimise(mt, optimizer, loss, step, settings)
    return StepResult(loss.detach(), terms, alpha)


def fast_step(
    mt: MeanTeacher,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    step: int,
    crit: Criteria,
    settings: StepSettings,
    *,
    channels_last: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[Any] = None,
    teacher_pass: bool = True,
) -> StepResult:
    """Same math as ``reference_step`` (see the module docstring) in one student forward/backward of the
    concatenated batches and no-grad teacher/Fuse forwards, with per-sub-batch BatchNorm.

    ``autocast_dtype``: run the forwards under autocast (not the same math to 1e-5, faster).
    ``teacher_pass=False`` (only without a fusion loss): skip the teacher and Fuse forwards, whose only
    effect is on their BN running statistics; their BN counters still advance. See ``teacher_tail``.
    """
    mt.train()
    sizes = [int(x.shape[0]) for x, _ in batches]
    x = torch.cat([b[0] for b in batches], dim=0) if len(batches) > 1 else batches[0][0]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    need_fusion_grad = settings.fusion_loss_weight > 0
    amp = (
        torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ghost_batchnorm([mt.student, mt.teacher, mt.fuse], sizes), amp:
        run_teacher = teacher_pass or need_fusion_grad
        s = mt.student.features(x, attention=run_teacher)  # the attention feeds only the Fuse
        if run_teacher:
            with torch.no_grad():
                t_map = mt.teacher.features(x).feature_map  # teacher head runs for its BN running statistics
            if need_fusion_grad:
                fz = mt.fuse(t_map, s.part_attention)
            else:
                with torch.no_grad():  # only the Fuse BN running statistics matter
                    fz = mt.fuse(t_map, [z.detach() for z in s.part_attention])
        else:
            with torch.no_grad():
                for m in (*mt.teacher.modules(), *mt.fuse.modules()):
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                        m.num_batches_tracked.add_(len(sizes))
    student_out = _split_output(s, sizes)
    fusion = [list(f) for f in zip(*[torch.split(t, sizes) for t in fz])] if need_fusion_grad else None
    loss, terms = lf2_loss(student_out, fusion, [y for _, y in batches], crit, settings)
    alpha = _optimise(mt, optimizer, loss, step, settings, scaler)
    return StepResult(loss.detach(), terms, alpha)


def teacher_tail(mt: MeanTeacher, batches_per_step: int, rel_tol: float = 2.0**-30) -> Optional[int]:
    """How many final iterations of a round need the teacher/Fuse forwards (paper recipe, no fusion loss).

    Without a fusion loss the teacher's and the Fuse's train-mode forwards influence nothing but their own
    BN running statistics, which are read only after the round (next extraction, evaluation). A running
    statistic after n more updates with momentum m keeps (1-m)^n of its earlier value, so once
    (1-m)^n < ``rel_tol`` (2^-30, far below float32 resolution 2^-24) the forwards before the last n are
    invisible in the round's float32 output. Returns that number of iterations (ceil(n / batches per
    step)), or None when a BN layer uses a cumulative average (momentum None) and nothing may be skipped.
    """
    moms = [m.momentum for mod in (mt.teacher, mt.fuse) for m in mod.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not moms or any(m is None or not 0 < m < 1 for m in moms):
        return None
    n = math.ceil(math.log(rel_tol) / math.log(1.0 - min(moms)))
    return math.ceil(n / max(1, batches_per_step))


def make_optimizer(mt: MeanTeacher, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over the trainable student parameters and the Fuse BN weights (as the released code; a
    parameter that receives no gradient, e.g. the attention in the paper recipe, is left untouched)."""
    params = [p for p in mt.student.parameters() if p.requires_grad]
    params += [p for p in mt.fuse.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def global_step(round_index: int, epoch: int, iteration: int, epochs_per_round: int, iters_per_epoch: int) -> int:
    """EMA step counter across rounds: ``(round * epochs_per_round + epoch) * iters_per_epoch + iteration``."""
    return (round_index * epochs_per_round + epoch) * iters_per_epoch + iteration


# ------------------------------------------------------------------------------------------ data
def _seed_words(*keys: int) -> list[int]:
    return [int(k) & 0xFFFFFFFF for k in keys]


class SeededBatchSampler:
    """Wraps a batch sampler of index lists into lists of ``(index, seed)``: the augmentation of every
    image is seeded by (``key``, batch number, position), so batch ``b`` is the same whatever the number
    of workers and whether the epoch is run in one go or resumed at ``start``."""

    def __init__(self, base: Any, key: Sequence[int], start: int = 0) -> None:
        self.base = base
        self.key = _seed_words(*key)
        self.start = int(start)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, batch in enumerate(self.base):
            if b < self.start:
                continue
            seeds = np.random.SeedSequence(self.key + [b]).generate_state(len(batch), dtype=np.uint64)
            yield [(int(i), int(s & 0x7FFFFFFFFFFFFFFF)) for i, s in zip(batch, seeds)]


class SeededDataset(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` computed under ``torch.manual_seed(seed)`` (forked
    RNG, so the caller's generator state is untouched)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def round_loaders(
    samples: Sequence[Any],
    label_sets: Sequence[np.ndarray],
    transform: Callable[[Any], Any],
    batch_size: int,
    num_instances: int,
    iters_per_epoch: int,
    seed: int,
    round_index: int,
    epoch: int,
    start: int = 0,
    num_workers: int = 0,
) -> list[DataLoader]:
    """One identity-balanced loader per label set for ``epoch`` of ``round_index``, from batch ``start``.

    The batches (identities, images, augmentation) are a function of (seed, round, epoch, label set,
    batch number) only.
    """
    from .data.loaders import ImageDataset
    from .data.samplers import IdentityBatchSampler

    camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
    loaders = []
    for k, labels in enumerate(label_sets):
        sampler_seed = int(np.random.SeedSequence(_seed_words(seed, round_index, k, 17)).generate_state(1)[0])
        base = IdentityBatchSampler(labels, camids, batch_size, num_instances, iters_per_epoch, sampler_seed)
        base.set_epoch(epoch)
        sampler = SeededBatchSampler(base, (seed, round_index, epoch, k, 29), start)
        ds = SeededDataset(ImageDataset(samples, transform, labels))
        loaders.append(
            DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available())
        )
    return loaders


# ------------------------------------------------------------------------------------------ labels
def prepare_label_sets(
    raw: Mapping[str, np.ndarray], policy: str, variant: str = "lf2"
) -> tuple[list[np.ndarray], int]:
    """Label arrays for the loaders and the number of global classes.

    ``raw``: ``global``/``upper``/``lower`` int arrays [N] with -1 = DBSCAN outlier. The outlier policy
    (``drop``: never sampled; ``singleton``: a class each) is applied to every set, then the global labels
    are renumbered 0..G-1 in order of first label value (empty k-means clusters disappear), -1 kept.
    Returns ([global, upper, lower] or [global] for ``mt_global``, G).
    """
    from .cluster import apply_outlier_policy

    names = LABEL_SETS[:1] if variant == "mt_global" else LABEL_SETS
    sets = [apply_outlier_policy(np.asarray(raw[n]), policy) for n in names]  # type: ignore[arg-type]
    g = sets[0]
    valid = g >= 0
    uniq, inv = np.unique(g[valid], return_inverse=True)
    renum = np.full_like(g, -1)
    renum[valid] = inv
    sets[0] = renum
    return sets, int(len(uniq))


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Mean feature per class 0..num_classes-1 (labels < 0 ignored), rows L2-normalised: [G, D] float32."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    keep = y >= 0
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    sums.index_add_(0, y[keep], f[keep].double())
    return F.normalize(sums.float(), dim=1)


# ------------------------------------------------------------------------------------------ epoch loop
@dataclass
class EpochResult:
    metrics: dict[str, float]
    completed: bool  # False when stopped early by ``stop_after`` (tests) -- state was saved


class Finetuner:
    """Runs epochs of one round on a ``MeanTeacher``. ``step_fn`` is ``fast_step`` (default) or
    ``reference_step``; ``save_fn(epoch, next_iteration, optimizer, partial_metrics)`` persists the
    resumable state (called every ``checkpoint_every`` iterations inside an epoch when > 0)."""

    def __init__(
        self,
        mt: MeanTeacher,
        settings: StepSettings,
        num_classes: int,
        lr: float,
        weight_decay: float,
        device: torch.device,
        *,
        fast: bool = True,
        channels_last: Optional[bool] = None,
        amp: bool = False,
    ) -> None:
        self.mt = mt
        self.settings = settings
        self.crit = Criteria(num_classes, settings.label_smoothing)
        self.lr = lr
        self.weight_decay = weight_decay
        self.device = device
        self.fast = fast
        self.channels_last = (device.type == "cuda") if channels_last is None else channels_last
        self.autocast_dtype: Optional[torch.dtype] = None
        self.scaler = None
        if amp and device.type == "cuda" and fast:
            if torch.cuda.is_bf16_supported():
                self.autocast_dtype = torch.bfloat16
            else:
                self.autocast_dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda")
        if self.channels_last:
            mt.to(memory_format=torch.channels_last)

    def new_optimizer(self) -> torch.optim.Adam:
        """A fresh Adam (the released code builds one per epoch)."""
        return make_optimizer(self.mt, self.lr, self.weight_decay)

    def step(self, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], step: int,
             teacher_pass: bool = True) -> StepResult:
        batches = [
            (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in batches
        ]
        if self.fast:
            return fast_step(
                self.mt, optimizer, batches, step, self.crit, self.settings, channels_last=self.channels_last,
                autocast_dtype=self.autocast_dtype, scaler=self.scaler, teacher_pass=teacher_pass,
            )
        return reference_step(self.mt, optimizer, batches, step, self.crit, self.settings)

    def run_epoch(
        self,
        loaders: Sequence[DataLoader],
        optimizer: torch.optim.Optimizer,
        first_step: int,
        start: int,
        iters: int,
        save_fn: Optional[Callable[[int, torch.optim.Optimizer, dict[str, float]], None]] = None,
        checkpoint_every: int = 0,
        sums: Optional[dict[str, float]] = None,
        progress: Optional[Any] = None,
        stop_after: Optional[int] = None,
        teacher_from: int = 0,
    ) -> EpochResult:
        """Iterations ``start..iters-1`` of an epoch (global step ``first_step + i``).

        ``sums``: running sums of the logged terms of iterations before ``start`` (resume). Returns mean
        terms (``loss``, ``ce``, ``tri_*``, ``acc``, ``alpha``, ``data_seconds``, ``step_seconds``).
        ``stop_after``: stop (after saving) once this many iterations of the epoch are done (tests).
        ``teacher_from``: first iteration that runs the teacher/Fuse forwards (``teacher_tail``).
        """
        sums = dict(sums or {})
        iterators = [iter(dl) for dl in loaders]
        t_data = t_step = 0.0
        for i in range(start, iters):
            t0 = time.perf_counter()
            batches = []
            for it in iterators:
                x, y, _, _ = next(it)
                batches.append((x, y))
            t1 = time.perf_counter()
            if i >= teacher_from:
                res = self.step(optimizer, batches, first_step + i)
            else:
                res = self.step(optimizer, batches, first_step + i, teacher_pass=False)
            vals = {"loss": float(res.loss), "alpha": res.alpha}
            vals.update({k: float(v) for k, v in res.terms.items()})
            t2 = time.perf_counter()
            t_data += t1 - t0
            t_step += t2 - t1
            vals["data_seconds"] = t1 - t0
            vals["step_seconds"] = t2 - t1
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(f"finetune: loss is {vals['loss']} at global step {first_step + i}")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{vals['loss']:.3f}", acc=f"{vals['acc']:.2f}")
            done = i + 1
            stop = stop_after is not None and done >= stop_after and done < iters
            if save_fn is not None and done < iters and (stop or (checkpoint_every > 0 and done % checkpoint_every == 0)):
                save_fn(done, optimizer, sums)
            if stop:
                return EpochResult(sums, completed=False)
        n = max(1, iters)
        means = {k: v / n for k, v in sums.items()}
        means["alpha"] = float(res.alpha) if iters > start else means.get("alpha", 0.0)
        return EpochResult(means, completed=True)
