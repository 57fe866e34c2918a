"""Mean teacher: an EMA copy of the LF2 student plus the Fuse module.

    teacher_t = alpha_t * teacher_{t-1} + (1 - alpha_t) * student_t,  alpha_t = min(1 - 1/(step+1), alpha)

applied to PARAMETERS only after every optimiser step (BN running statistics of the teacher come from its
own train-mode forwards, as in the released code). At step 0, alpha_t = 0: the teacher becomes a copy.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lf2 import Fuse, LF2Model, build_student


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of an image batch [B,3,H,W]."""
    return torch.flip(x, dims=[3])


class MeanTeacher(nn.Module):
    """``.student`` (trained), ``.teacher`` (EMA, no grad), ``.fuse`` (BN weights trainable, bias frozen)."""

    def __init__(self, student: LF2Model, fuse: Optional[Fuse] = None, teacher: Optional[LF2Model] = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher if teacher is not None else copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.fuse = fuse if fuse is not None else Fuse(student.out_channels, student.num_parts)

    @torch.no_grad()
    def update_teacher(self, step: int, alpha: float = 0.999) -> float:
        """EMA of parameters (not buffers) with alpha_t = min(1 - 1/(step+1), alpha); returns alpha_t."""
        a = min(1.0 - 1.0 / (step + 1), alpha)
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student.parameters()]
        if len(t_params) != len(s_params) or any(t.shape != s.shape for t, s in zip(t_params, s_params)):
            raise RuntimeError("teacher and student parameters differ (reset both classifiers together)")
        torch._foreach_mul_(t_params, a)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - a)
        return a

    def reset_classifier(self, centroids: torch.Tensor) -> None:
        """Set the classifier of student AND teacher to the L2-normalised ``centroids`` [N,C]."""
        self.student.reset_classifier(centroids)
        self.teacher.reset_classifier(centroids)
        self.teacher.classifier.weight.requires_grad_(False)

    def fusion_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` [B,3,H,W] -> K+1 fusion features [B,C]: Fuse(teacher map, student attention).

        Runs in the modules' current modes (eval for clustering features, train inside finetuning).
        """
        z = self.student.features(x).part_attention
        with torch.no_grad():
            fmap = self.teacher.backbone(x)
        return self.fuse(fmap, z)

    @torch.no_grad()
    def test_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher test feature of ``x`` [B,3,H,W] plus its horizontal flip, renormalised: [B,(K+1)C]."""
        with _eval_mode(self.teacher):
            f = self.teacher(x) + self.teacher(hflip(x))
        return F.normalize(f, dim=1)


def build_target_model(cfg: Any, source_state: Mapping[str, Any], num_classes: Optional[int] = None) -> MeanTeacher:
    """Round-0 ``MeanTeacher`` from a source checkpoint (lf2 checkpoint dict or state dict).

    Student and teacher both start from the source backbone; the student's random heads and the Fuse
    are drawn from ``cfg.seed`` (deterministic across stages); the teacher is a copy of the student.
    """
    student = build_student(cfg, source_state, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed) + 1)
        fuse = Fuse(student.out_channels, student.num_parts)
    return MeanTeacher(student, fuse)


def load_mean_teacher(
    student_state: Mapping[str, torch.Tensor],
    teacher_state: Mapping[str, torch.Tensor],
    arch: str,
    num_parts: int = 2,
    reduction: int = 4,
    last_stride: int = 1,
) -> MeanTeacher:
    """Rebuild a ``MeanTeacher`` from finetune checkpoints (``student.pt`` / ``teacher.pt`` state dicts).

    ``student_state`` holds ``student.*`` (and ``fuse.*``) or the bare student keys; the classifier size
    is read from ``classifier.weight``.
    """

    def strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return dict(state)

    s = strip(student_state, "student.")
    t = strip(teacher_state, "teacher.")
    fuse_state = {k[len("fuse."):]: v for k, v in {**teacher_state, **student_state}.items() if k.startswith("fuse.")}
    n = int(s["classifier.weight"].shape[0])
    student = LF2Model(arch, n, num_parts, reduction, "none", last_stride)
    teacher = LF2Model(arch, n, num_parts, reduction, "none", last_stride)
    student.load_state_dict(s)
    teacher.load_state_dict(t)
    fuse = Fuse(student.out_channels, num_parts)
    if fuse_state:
        fuse.load_state_dict(fuse_state)
    return MeanTeacher(student, fuse, teacher)
