"""ResNet backbones with a configurable last stride (1 in LF2), and their initial weights.

``build_backbone(arch, weights, last_stride)`` returns ``(module, out_channels)``; the module maps an
image batch ``[B, 3, H, W]`` to a feature map ``[B, C, H/16, W/16]`` with ``last_stride=1`` (``H/32, W/32``
with 2). Architectures:

============== ====================== ==================== =========================================
arch            blocks                 widths (layer1..4)   C (out_channels)
============== ====================== ==================== =========================================
resnet50        Bottleneck [3,4,6,3]   64/128/256/512 (x4)  2048  (the paper)
resnet18        BasicBlock [2,2,2,2]   64/128/256/512       512
resnet18_narrow BasicBlock [2,2,2,2]   32/64/128/256        256   (CPU demo and tests; stem 32 channels)
============== ====================== ==================== =========================================

The module's parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) so a
torchvision ResNet state dict loads directly (its ``fc.*`` entries are ignored).

``weights``: ``"none"`` -> random init (Kaiming, as torchvision); ``"imagenet"`` -> torchvision's
``IMAGENET1K_V1`` weights (needs network access or a filled ``$TORCH_HOME`` cache); anything else is a
local path or ``s3://`` URI of a state dict, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..errors import CheckpointError, Lf2Error

log = logging.getLogger(__name__)

ARCHS = ("resnet50", "resnet18", "resnet18_narrow")
_NARROW_WIDTHS = (32, 64, 128, 256)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and classifier: ``[B,3,H,W] -> [B,C,h,w]``."""

    def __init__(self, resnet: nn.Module, out_channels: int, arch: str) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = out_channels
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, H, W] -> feature map [B, C, H/16, W/16] (last stride 1)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _init_random(module: nn.Module) -> None:
    """torchvision's ResNet initialisation (Kaiming fan_out convs, BN weight 1 / bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class _NarrowResNet18(nn.Module):
    """ResNet-18 topology with widths 32/64/128/256 (a 32-channel stem); torchvision parameter names."""

    def __init__(self) -> None:
        super().__init__()
        w = _NARROW_WIDTHS
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer(w[0], w[0], 2, 1)
        self.layer2 = _make_layer(w[0], w[1], 2, 2)
        self.layer3 = _make_layer(w[1], w[2], 2, 2)
        self.layer4 = _make_layer(w[2], w[3], 2, 2)
        _init_random(self)


def _set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    """Set the stride of the first block of layer4 (its strided conv and its downsample conv)."""
    block = layer4[0]
    if isinstance(block, Bottleneck):
        block.conv2.stride = (stride, stride)  # torchvision v1.5: the stride sits on the 3x3 conv
    else:
        block.conv1.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    enums = {
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    }
    if arch not in enums:
        raise Lf2Error(
            f"config key 'model.weights': 'imagenet' has no torchvision weights for arch {arch!r}; "
            "use 'none' or a local path / s3:// URI"
        )
    try:
        return enums[arch].get_state_dict(progress=False)
    except Exception as e:  # offline, proxy, corrupt cache...
        raise Lf2Error(
            f"config key 'model.weights': could not download torchvision ImageNet weights for {arch} ({e}); "
            "pass a local path or s3:// URI of the state dict, or 'none' for random init"
        ) from None


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or s3:// URI (``torch.load(weights_only=True)``).

    Accepts a bare state dict, or a dict holding one under ``state_dict`` / ``model`` (lf2 and most
    training-framework checkpoints). ``module.`` prefixes (DataParallel) are stripped.
    """
    from .. import storage

    try:
        path = storage.local_path(uri)
        obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Lf2Error as e:
        raise CheckpointError(f"weights {uri}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"weights {uri}: not a readable torch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights {uri}: expected a state dict (name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_backbone_state(backbone: ResNetBackbone, state: Mapping[str, torch.Tensor], origin: str) -> dict[str, Any]:
    """Load a torchvision-style ResNet state dict into ``backbone``.

    ``fc.*`` is ignored; ``backbone.`` / ``base.`` prefixes are accepted. Shape mismatches and a state
    that matches nothing raise ``CheckpointError`` naming ``origin``; missing/unexpected keys are logged
    and returned.
    """
    own = backbone.state_dict()
    cleaned: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("backbone.", "base."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            continue
        cleaned[k] = v
    mismatched = [k for k, v in cleaned.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"weights {origin}: {len(mismatched)} tensors do not fit arch {backbone.arch!r}, e.g. {k} "
            f"{tuple(cleaned[k].shape)} vs {tuple(own[k].shape)}"
        )
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    if len(missing) == len(own):
        raise CheckpointError(f"weights {origin}: no tensor matches a {backbone.arch} backbone")
    backbone.load_state_dict(cleaned, strict=False)
    if missing:
        log.warning("weights %s: %d missing keys (kept at init), e.g. %s", origin, len(missing), missing[:5])
    if unexpected:
        log.warning("weights %s: %d unexpected keys ignored, e.g. %s", origin, len(unexpected), unexpected[:5])
    return {"loaded": len(own) - len(missing), "missing": missing, "unexpected": unexpected}


def build_backbone(arch: str, weights: str = "none", last_stride: int = 1) -> tuple[ResNetBackbone, int]:
    """Build a ResNet trunk. Returns ``(module, out_channels)``; see the module docstring."""
    if arch not in ARCHS:
        raise Lf2Error(f"config key 'model.arch': unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    if last_stride not in (1, 2):
        raise Lf2Error(f"config key 'model.last_stride': must be 1 or 2, got {last_stride}")
    if arch == "resnet50":
        net, channels = torchvision.models.resnet50(weights=None), 2048
    elif arch == "resnet18":
        net, channels = torchvision.models.resnet18(weights=None), 512
    else:
        net, channels = _NarrowResNet18(), _NARROW_WIDTHS[-1]
    backbone = ResNetBackbone(net, channels, arch)
    weights = weights or "none"
    if weights == "none":
        log.info("backbone %s: random initialisation (model.weights=none)", arch)
    elif weights == "imagenet":
        load_backbone_state(backbone, _imagenet_state(arch), f"torchvision {arch} IMAGENET1K_V1")
        log.info("backbone %s: torchvision ImageNet weights", arch)
    else:
        load_backbone_state(backbone, read_state_dict(weights), weights)
        log.info("backbone %s: weights from %s", arch, weights)
    _set_last_stride(backbone.layer4, last_stride)
    return backbone, channels
