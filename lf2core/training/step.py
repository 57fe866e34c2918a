"""The LF2 mean-teacher optimisation step: a reference and a fast version with the same math, the loss,
the optimiser and the EMA step counter.

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
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..losses import CrossEntropyLabelSmooth, SoftTripletLoss
from ..models.lf2 import LF2Output
from ..models.teacher import MeanTeacher
from ..variants import Variant, get_variant
from .camera_proxy import CamProxy, add_camera_proxy_loss, update_camera_proxy
from .ghost_bn import bn_groups, ghost_batchnorm  # noqa: F401  (bn_groups: re-exported)

# ------------------------------------------------------------------------------------------ settings
@dataclass
class StepSettings:
    """Everything one optimisation step needs besides weights and data (from ``cfg.finetune``)."""

    variant: str = "lf2"  # a trainable name of ``lf2core.variants.VARIANTS``
    part_loss_weight: float = 0.5
    fusion_loss_weight: float = 0.0
    label_smoothing: float = 0.1
    ema_alpha: float = 0.999
    bn_group: int = 0  # student/teacher BatchNorm over groups of this many images of a batch (0 = whole batch)

    @classmethod
    def from_config(cls, finetune_cfg: Any) -> "StepSettings":
        get_variant(finetune_cfg.variant)  # ValueError naming the key for an unknown variant
        return cls(
            variant=finetune_cfg.variant,
            part_loss_weight=float(finetune_cfg.part_loss_weight),
            fusion_loss_weight=float(finetune_cfg.fusion_loss_weight),
            label_smoothing=float(finetune_cfg.label_smoothing),
            ema_alpha=float(finetune_cfg.ema_alpha),
            bn_group=int(getattr(finetune_cfg, "bn_group", 0)),
        )

    def num_batches(self, num_parts: int) -> int:
        """Batches per step: 1 + K for LF2, 1 for ``mt_global``."""
        return self.method.num_batches(num_parts)

    @property
    def method(self) -> Variant:
        """The variant object (``lf2core.variants``)."""
        return get_variant(self.variant)


class Criteria:
    """The losses of one round: label-smoothed CE over ``num_classes`` clusters and a soft triplet."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.1) -> None:
        self.ce = CrossEntropyLabelSmooth(num_classes, label_smoothing)
        self.tri = SoftTripletLoss(margin=0.0)


Batch = tuple[torch.Tensor, torch.Tensor]  # (images [B,3,H,W] float, labels [B] int64)


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
    scaler: Optional[Any] = None, dist: Optional[Any] = None,
) -> float:
    """Backward, (data parallel: gradients summed over ranks), optimiser step, EMA teacher update, (data
    parallel: BN buffers := rank 0's, so every rank holds the same student, teacher and Fuse)."""
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if dist is not None:
            dist.sum_gradients(params)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if dist is not None:
            dist.sum_gradients(params)
        optimizer.step()
    alpha = mt.update_teacher(step, settings.ema_alpha)
    if dist is not None:
        dist.broadcast_buffers([mt.student, mt.teacher, mt.fuse])
    return alpha


def _gathered(out: LF2Output, index: int, d: Any) -> LF2Output:
    """The loss inputs of batch ``index`` (0: logits + global feature, j: part feature j) of every rank
    in rank order (``Dist.all_gather_cat``); the other fields stay local (the loss does not read them)."""
    parts = list(out.part_feats)
    if index == 0:
        return LF2Output(out.feature_map, d.all_gather_cat(out.global_feat), parts, list(out.part_attention),
                         d.all_gather_cat(out.logits))
    parts[index - 1] = d.all_gather_cat(parts[index - 1])
    return LF2Output(out.feature_map, out.global_feat, parts, list(out.part_attention), out.logits)


def reference_step(
    mt: MeanTeacher,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    step: int,
    crit: Criteria,
    settings: StepSettings,
    cam_proxy: CamProxy = None,
) -> StepResult:
    """The released iteration, written plainly: every batch through student, teacher and Fuse (train
    mode, autograd on), the loss, one Adam step, the EMA update. The yardstick for ``fast_step``.
    ``cam_proxy``: add the camera proxy loss of the global batch, then update its memory
    (``lf2core.training.camera_proxy``)."""
    mt.train()
    student_out, fusion = [], []
    for x, _ in batches:
        with bn_groups([mt.student, mt.teacher], int(x.shape[0]), settings.bn_group):
            s = mt.student(x)
            t = mt.teacher(x)
        fusion.append(mt.fuse(t.feature_map, s.part_attention))
        student_out.append(s)
    loss, terms = lf2_loss(student_out, fusion, [y for _, y in batches], crit, settings)
    loss = add_camera_proxy_loss(loss, terms, cam_proxy, student_out[0].global_feat)
    alpha = _optimise(mt, optimizer, loss, step, settings)
    update_camera_proxy(cam_proxy, student_out[0].global_feat)
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
    dist: Optional[Any] = None,
    cam_proxy: CamProxy = None,
) -> StepResult:
    """Same math as ``reference_step`` (see the module docstring) in one student forward/backward of the
    concatenated batches and no-grad teacher/Fuse forwards, with per-sub-batch BatchNorm.

    ``autocast_dtype``: run the forwards under autocast (not the same math to 1e-5, faster).
    ``teacher_pass=False`` (only without a fusion loss): skip the teacher and Fuse forwards, whose only
    effect is on their BN running statistics; their BN counters still advance. See ``teacher_tail``.

    ``dist`` (an active ``lf2core.distributed.Dist``; no fusion loss): ``batches`` are this rank's slices
    of the global batches. Student and teacher BN normalise the local slice (per-rank BN = one process
    with ``bn_group`` = the slice size; with ``dist.sync_bn`` the rows of all ranks = one process with
    ``bn_group`` 0), the Fuse BN the rows of all ranks (as one process); the loss is
    computed on the gathered global batch, gradients are summed over ranks, BN buffers are rank 0's.
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
    # the released code wraps student and teacher in nn.DataParallel, not the Fuse: only they get bn_group
    parallel = dist is not None and dist.active
    if parallel and need_fusion_grad:
        raise ValueError("finetune.fusion_loss_weight > 0 is not supported with WORLD_SIZE > 1")
    if settings.bn_group > 0 or parallel:
        sync_bn = dist if parallel and dist.sync_bn else None
        bns: contextlib.AbstractContextManager = contextlib.ExitStack()
        bns.enter_context(ghost_batchnorm([mt.student, mt.teacher], sizes, settings.bn_group, sync=sync_bn))
        bns.enter_context(ghost_batchnorm([mt.fuse], sizes, sync=dist if parallel else None))
    else:
        bns = ghost_batchnorm([mt.student, mt.teacher, mt.fuse], sizes)
    with bns, amp:
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
    labels = [y for _, y in batches]
    if parallel:
        student_out = [_gathered(o, k, dist) for k, o in enumerate(student_out)]
        labels = [dist.all_gather_cat(y) for y in labels]
        if cam_proxy is not None:
            cam_proxy = (cam_proxy[0], dist.all_gather_cat(cam_proxy[1]))
    loss, terms = lf2_loss(student_out, fusion, labels, crit, settings)
    loss = add_camera_proxy_loss(loss, terms, cam_proxy, student_out[0].global_feat)
    alpha = _optimise(mt, optimizer, loss, step, settings, scaler, dist if parallel else None)
    update_camera_proxy(cam_proxy, student_out[0].global_feat)
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

