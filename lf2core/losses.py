"""Losses of LF2 (as in MMT / MEB-Net): label-smoothed cross-entropy and batch-hard triplet losses.

- ``CrossEntropyLabelSmooth(num_classes, epsilon=0.1)``: targets ``(1-eps)*onehot + eps/N``,
  loss = mean over the batch of ``-sum_c q_c log p_c``.
- ``TripletLoss(margin)``: batch-hard (hardest positive = farthest same-label sample, hardest negative
  = closest other-label sample) on Euclidean distances; ``mean(relu(d_ap - d_an + margin))``.
- ``SoftTripletLoss(margin=0.0)``: the same hard pairs; with p = softmax([d_ap, d_an]) the loss is
  ``mean(-(margin * log p_ap + (1 - margin) * log p_an))``; for margin 0 this is ``mean(softplus(d_ap - d_an))``.

Distances: ``d(i,j) = sqrt(max(|xi|^2 + |xj|^2 - 2 xi.xj, 1e-12))`` (MMT's ``euclidean_dist``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x`` [M,D], ``y`` [N,D] -> [M,N] Euclidean distances (clamped at sqrt(1e-12))."""
    x = x.float()
    y = y.float()
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dist`` [N,N], ``labels`` [N] -> (d_ap [N] hardest positive, d_an [N] hardest negative).

    The anchor itself counts as a positive (distance ~0), as in MMT. An anchor without any negative
    (one label in the batch) gets d_an = +inf (zero loss).
    """
    same = labels[:, None] == labels[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    return d_ap, d_an


class CrossEntropyLabelSmooth(nn.Module):
    """Label-smoothed cross-entropy. ``forward(logits [B,N], targets [B] int) -> scalar``."""

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = logits.shape[1]
        if n != self.num_classes:
            raise ValueError(f"logits have {n} classes, loss built for {self.num_classes}")
        logp = F.log_softmax(logits.float(), dim=1)
        q = torch.full_like(logp, self.epsilon / n)
        q.scatter_add_(1, targets[:, None].long(), torch.full_like(logp[:, :1], 1.0 - self.epsilon))
        return -(q * logp).sum(dim=1).mean()


class TripletLoss(nn.Module):
    """Batch-hard triplet with a hard margin. ``forward(feats [B,D], labels [B]) -> scalar``."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d_ap, d_an = hard_example_mining(euclidean_dist(feats, feats), labels)
        return F.relu(d_ap - d_an + self.margin).mean()


class SoftTripletLoss(nn.Module):
    """Batch-hard soft-margin triplet (MMT). ``forward(feats [B,D], labels [B]) -> scalar``."""

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d_ap, d_an = hard_example_mining(euclidean_dist(feats, feats), labels)
        # -log p_an = softplus(d_ap - d_an), -log p_ap = softplus(d_an - d_ap) (stable, inf-safe)
        loss = (1.0 - self.margin) * F.softplus(d_ap - d_an)
        if self.margin != 0:
            loss = loss + self.margin * F.softplus(d_an - d_ap)
        return loss.mean()


def triplet_loss(margin: float) -> nn.Module:
    """``margin <= 0`` -> ``SoftTripletLoss(0)`` (the paper), else a hard-margin ``TripletLoss``."""
    return SoftTripletLoss(0.0) if margin <= 0 else TripletLoss(margin)
