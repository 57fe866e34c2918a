"""Image transforms (torchvision.transforms.v2), as in the released LF2 / MMT code.

Both take a PIL RGB image and return a normalised float32 tensor [3, height, width].

- train: bicubic resize to (height, width) -> horizontal flip (p 0.5) -> zero pad 10 px -> random crop
  (height, width) -> float tensor in [0, 1] -> ImageNet normalisation -> optional RandomErasing
  (probability ``random_erasing``, area 2%-40%, aspect ratio 0.3-3.33, filled with the ImageNet mean
  *values* on the normalised tensor, exactly like the released code's RandomErasing).
- test: bicubic resize -> float tensor -> ImageNet normalisation.

Geometric operations run on the PIL image (PIL bicubic, like ``T.Resize(interpolation=3)`` there).
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD = 10


def _to_normalised_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ]


def train_transform(height: int, width: int, random_erasing: float = 0.0) -> v2.Compose:
    """Training augmentation: PIL image -> float32 tensor [3, height, width]."""
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
    steps: list[v2.Transform] = [
        v2.Resize((height, width), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Pad(PAD, fill=0),
        v2.RandomCrop((height, width)),
        *_to_normalised_tensor(),
    ]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, scale=(0.02, 0.4), ratio=(0.3, 3.33),
                                      value=list(IMAGENET_MEAN)))
    return v2.Compose(steps)


def test_transform(height: int, width: int) -> v2.Compose:
    """Evaluation / feature extraction: PIL image -> float32 tensor [3, height, width]."""
    return v2.Compose([
        v2.Resize((height, width), interpolation=InterpolationMode.BICUBIC, antialias=True),
        *_to_normalised_tensor(),
    ])


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into one
