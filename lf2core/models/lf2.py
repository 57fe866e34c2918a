"""The LF2 target model (global feature + K horizontal part experts + channel attention) and Fuse.

Shapes below use C = backbone channels (2048 resnet50, 512 resnet18, 256 resnet18_narrow) and a
feature map of h x w (h = H/16 with last stride 1: 16x8 for 256x128 input, 4x2 for 64x32).

LF2Model, per image batch ``x`` [B,3,H,W]:

- ``feature_map`` F = backbone(x)                                           [B,C,h,w]
- global ``f0`` = BN_g(GAP(F) + GMP(F))                                      [B,C]  (BN bias frozen)
- parts: F is cut into K horizontal bands of rows (K=2: rows 0:h/2 upper, h/2:h lower; with h not a
  multiple of K the last band takes the remainder). For band Fj:
  expert ``fj`` = BN_j(Linear_j(cat(GAP(Fj), GMP(Fj))))  Linear 2C -> C, Kaiming fan_out, bias 0   [B,C]
  attention ``Zj`` = (GAP(Fj)+GMP(Fj)) * sigmoid(mlp(GMP(Fj)) + mlp(GAP(Fj)))                   [B,C]
  with mlp a shared (per part) 1x1 conv C -> C/r -> C, ReLU between, no bias (CBAM channel attention).
- ``logits`` = classifier(f0), Linear(C, num_classes, bias=False)          [B,num_classes]
- eval forward: the test feature normalize(cat[f0, f1, .., fK])             [B,(K+1)C]

Fuse (teacher map Φ [B,C,h,w], student attention Z list of K [B,C]) -> K+1 fusion features [B,C]:
φ0 = BN_0(GMP(Φ)+GAP(Φ)); φj = BN_j(GMP(Φ⊙Zj)+GAP(Φ⊙Zj)) with Zj broadcast over h, w. BN weight 1,
bias 0 frozen. As in the released code, Z (and so the attention MLPs) never enter the paper loss.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone
from .source import bn_neck

log = logging.getLogger(__name__)


class LF2Output(NamedTuple):
    """Train-mode output of ``LF2Model`` (see the module docstring for definitions)."""

    feature_map: torch.Tensor  # [B, C, h, w]
    global_feat: torch.Tensor  # [B, C] post-BN f0
    part_feats: list[torch.Tensor]  # K x [B, C] post-BN fj
    part_attention: list[torch.Tensor]  # K x [B, C] Zj
    logits: torch.Tensor  # [B, num_classes]


def gap_gmp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [B,C,h,w] -> (global average pool [B,C], global max pool [B,C])."""
    return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def split_rows(fmap: torch.Tensor, num_parts: int) -> list[torch.Tensor]:
    """Cut ``fmap`` [B,C,h,w] into ``num_parts`` horizontal bands of h // K rows (last takes the rest)."""
    h = fmap.shape[2]
    if h < num_parts:
        raise ValueError(f"feature map height {h} is smaller than num_parts={num_parts}")
    step = h // num_parts
    return [fmap[:, :, j * step : (h if j == num_parts - 1 else (j + 1) * step)] for j in range(num_parts)]


class ChannelAttention(nn.Module):
    """CBAM channel attention: ``sigmoid(mlp(GMP(x)) + mlp(GAP(x)))`` [B,C] for ``x`` [B,C,h,w]."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """``avg``, ``mx`` [B,C] pooled descriptors -> channel weights in (0,1) [B,C]."""
        a = self.mlp(avg[:, :, None, None])
        m = self.mlp(mx[:, :, None, None])
        return torch.sigmoid(a + m).flatten(1)


class LF2Model(nn.Module):
    """LF2 student/teacher network. Attributes: ``arch``, ``num_classes``, ``num_parts``, ``out_channels``."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        num_parts: int = 2,
        reduction: int = 4,
        weights: str = "none",
        last_stride: int = 1,
    ) -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {num_parts}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.num_parts = num_parts
        self.reduction = reduction
        self.last_stride = last_stride
        self.backbone, c = build_backbone(arch, weights, last_stride)
        self.out_channels = c
        self.global_bn = bn_neck(c)
        self.experts = nn.ModuleList(nn.Linear(2 * c, c) for _ in range(num_parts))
        for lin in self.experts:
            nn.init.kaiming_normal_(lin.weight, mode="fan_out")
            nn.init.constant_(lin.bias, 0.0)
        self.part_bns = nn.ModuleList(bn_neck(c) for _ in range(num_parts))
        self.attentions = nn.ModuleList(ChannelAttention(c, reduction) for _ in range(num_parts))
        self.classifier = nn.Linear(c, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    # ------------------------------------------------------------------ forward
    def head(self, fmap: torch.Tensor, attention: bool = True) -> LF2Output:
        """All branch outputs from a backbone map ``fmap`` [B,C,h,w] (any mode).

        ``attention=False`` leaves ``part_attention`` empty (it feeds only the Fuse module; skipping it
        changes no other output).
        """
        avg, mx = gap_gmp(fmap)
        f0 = self.global_bn(avg + mx)
        parts, attn = [], []
        for j, band in enumerate(split_rows(fmap, self.num_parts)):
            pa, pm = gap_gmp(band)
            parts.append(self.part_bns[j](self.experts[j](torch.cat([pa, pm], dim=1))))
            if attention:
                attn.append((pa + pm) * self.attentions[j](pa, pm))
        return LF2Output(fmap, f0, parts, attn, self.classifier(f0))

    def features(self, x: torch.Tensor, attention: bool = True) -> LF2Output:
        """``x`` [B,3,H,W] -> ``LF2Output`` regardless of train/eval mode (``attention``: see ``head``)."""
        return self.head(self.backbone(x), attention)

    @staticmethod
    def test_feature(out: LF2Output) -> torch.Tensor:
        """normalize(cat[f0, f1..fK]) [B,(K+1)C] from an ``LF2Output``."""
        return F.normalize(torch.cat([out.global_feat, *out.part_feats], dim=1), dim=1)

    def forward(self, x: torch.Tensor) -> LF2Output | torch.Tensor:
        """Train: ``LF2Output``; eval: the test feature [B,(K+1)C] (unit rows)."""
        out = self.features(x)
        return out if self.training else self.test_feature(out)

    # ------------------------------------------------------------------ weights
    def load_source_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copy every tensor of ``state_dict`` whose name and shape match (the released copy_state_dict).

        Returns ``{"loaded": [...], "skipped": [...], "missing": [...]}`` (skipped: given but absent here or of
        another shape; missing: own tensors left at their initial value).
        """
        own = self.state_dict()
        loaded, skipped = [], []
        with torch.no_grad():
            for k, v in state_dict.items():
                k = k[len("module."):] if k.startswith("module.") else k
                if k in own and own[k].shape == v.shape:
                    own[k].copy_(v)
                    loaded.append(k)
                else:
                    skipped.append(k)
        done = set(loaded)
        missing = [k for k in own if k not in done]
        return {"loaded": loaded, "skipped": skipped, "missing": missing}

    @classmethod
    def from_source(
        cls,
        source_state_dict: Mapping[str, torch.Tensor],
        arch: str,
        num_classes: int,
        num_parts: int = 2,
        reduction: int = 4,
        last_stride: int = 1,
    ) -> "LF2Model":
        """A new model (random heads) whose backbone comes from a ``SourceModel`` state dict."""
        model = cls(arch, num_classes, num_parts, reduction, weights="none", last_stride=last_stride)
        info = model.load_source_weights(source_state_dict)
        missing_bb = [k for k in info["missing"] if k.startswith("backbone.")]
        if missing_bb:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"source weights do not fit an {arch} LF2 model: {len(missing_bb)} backbone tensors missing or "
                f"of another shape, e.g. {missing_bb[0]}"
            )
        log.info("LF2 model from source: %d tensors copied, %d skipped", len(info["loaded"]), len(info["skipped"]))
        return model

    @torch.no_grad()
    def reset_classifier(self, centroids: torch.Tensor) -> None:
        """Replace the classifier by ``Linear(C, N, bias=False)`` with weights = L2-normalised ``centroids`` [N,C]."""
        centroids = torch.as_tensor(centroids)
        if centroids.ndim != 2 or centroids.shape[1] != self.out_channels:
            raise ValueError(f"centroids must be [N, {self.out_channels}], got {tuple(centroids.shape)}")
        ref = self.classifier.weight
        lin = nn.Linear(self.out_channels, centroids.shape[0], bias=False).to(device=ref.device, dtype=ref.dtype)
        lin.weight.copy_(F.normalize(centroids.to(device=ref.device, dtype=ref.dtype), dim=1))
        lin.weight.requires_grad_(ref.requires_grad)
        self.classifier = lin
        self.num_classes = int(centroids.shape[0])


class Fuse(nn.Module):
    """Fusion of the TEACHER feature map with the STUDENT part attention; one BN (bias frozen) per output."""

    def __init__(self, channels: int, num_parts: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.num_parts = num_parts
        self.bns = nn.ModuleList(bn_neck(channels) for _ in range(num_parts + 1))

    def forward(self, teacher_map: torch.Tensor, student_attention: list[torch.Tensor]) -> list[torch.Tensor]:
        """``teacher_map`` [B,C,h,w], ``student_attention`` K x [B,C] -> K+1 fusion features [B,C]."""
        if len(student_attention) != self.num_parts:
            raise ValueError(f"expected {self.num_parts} attention vectors, got {len(student_attention)}")
        avg, mx = gap_gmp(teacher_map)
        out = [self.bns[0](avg + mx)]
        for j, z in enumerate(student_attention):
            a, m = gap_gmp(teacher_map * z[:, :, None, None])
            out.append(self.bns[j + 1](a + m))
        return out


def set_bn_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``module`` in eval mode (frozen running statistics); returns it."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def source_state_of(obj: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The state dict inside an lf2 checkpoint dict, or ``obj`` itself when it already is one."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]
    return obj  # type: ignore[return-value]


def build_student(cfg: Any, source_state: Mapping[str, Any], num_classes: Optional[int] = None) -> LF2Model:
    """``LF2Model`` from a source checkpoint (dict or state dict), heads initialised from ``cfg.seed``.

    The random heads (experts, attention MLPs, classifier) are drawn under ``torch.manual_seed(cfg.seed)``
    in a forked RNG, so every stage that builds the round-0 model from the same source checkpoint gets
    identical weights (the attention stays at this init in the paper recipe).
    """
    n = num_classes or max(2, int(cfg.cluster.num_clusters))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        return LF2Model.from_source(
            source_state_of(source_state),
            arch=cfg.model.arch,
            num_classes=n,
            num_parts=cfg.model.num_parts,
            reduction=cfg.model.attention_reduction,
            last_stride=cfg.model.last_stride,
        )
