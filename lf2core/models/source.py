"""The source-domain model of stage 1 (MMT / MEB-Net ``resnet50_source``).

    image [B,3,H,W] -> backbone -> map [B,C,h,w] -> GAP -> f [B,C] -> feat_bn (BN1d, bias frozen at 0)
    -> classifier Linear(C, num_classes, bias=False, N(0, 0.001))

Train mode returns ``(f, logits)`` with ``f`` the pooled feature BEFORE the BN neck (the triplet loss uses
it) and ``logits = classifier(feat_bn(f))`` [B, num_classes]. Eval mode returns the L2-normalised BN
feature [B, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone


def bn_neck(channels: int) -> nn.BatchNorm1d:
    """BatchNorm1d with weight 1, bias 0 and the bias frozen (``requires_grad=False``)."""
    bn = nn.BatchNorm1d(channels)
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 0.0)
    bn.bias.requires_grad_(False)
    return bn


class SourceModel(nn.Module):
    """Backbone + GAP + BN neck + bias-free classifier. Attributes: ``arch``, ``num_classes``, ``out_channels``."""

    def __init__(self, arch: str, num_classes: int, weights: str = "none", last_stride: int = 1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.backbone, self.out_channels = build_backbone(arch, weights, last_stride)
        self.feat_bn = bn_neck(self.out_channels)
        self.classifier = nn.Linear(self.out_channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """``x`` [B,3,H,W] -> train: ``(feat_pre_bn [B,C], logits [B,num_classes])``; eval: [B,C] unit rows."""
        fmap = self.backbone(x)
        feat = fmap.mean(dim=(2, 3))
        bn_feat = self.feat_bn(feat)
        if not self.training:
            return F.normalize(bn_feat, dim=1)
        return feat, self.classifier(bn_feat)
