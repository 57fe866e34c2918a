"""Image transforms (torchvision.transforms.v2), as in the released LF2 / MMT code.

Both take a PIL RGB image and return a normalised float32 tensor [3, height, width].

- train: bicubic resize to (height, width) -> horizontal flip (p 0.5) -> zero pad 10 px -> random crop
  (height, width) -> float tensor in [0, 1] -> ImageNet normalisation -> optional random erasing
  (probability ``random_erasing``, area 2%-40% of the image, aspect ratio in [0.3, 3.33], filled with the
  ImageNet mean *values* on the normalised tensor, like the released code). ``erasing`` picks the law:
  ``torchvision`` (``v2.RandomErasing``: aspect ratio LOG-uniform, up to 10 tries) or ``released``
  (``ReleasedErasing``: aspect ratio uniform in [0.3, 1/0.3], up to 100 tries, as the released code's
  RandomErasing; more of its regions are tall).
- test: bicubic resize -> float tensor -> ImageNet normalisation.

Geometric operations run on the PIL image (PIL bicubic, like ``T.Resize(interpolation=3)`` there).
"""

from __future__ import annotations

import math

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


class ReleasedErasing(torch.nn.Module):
    """Random erasing as the released LF2 code's RandomErasing, on a tensor [C, H, W] (lf2's own code).

    With probability ``p``: up to ``tries`` times draw an area fraction s ~ U(sl, sh) and an aspect ratio
    r ~ U(r1, 1/r1) (uniform, not log-uniform); h = round(sqrt(s*H*W*r)), w = round(sqrt(s*H*W/r)); the
    first draw with h < H and w < W erases rows [i, i+h) and columns [j, j+w), i ~ U{0..H-h},
    j ~ U{0..W-w}, channel c := ``value[c]``; no fitting draw leaves the image unchanged. Random numbers
    come from torch's global generator (the seeded loaders fix it per image).
    """

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3, tries: int = 100,
                 value: tuple[float, ...] = IMAGENET_MEAN) -> None:
        super().__init__()
        self.p, self.sl, self.sh, self.r1, self.tries, self.value = p, sl, sh, r1, tries, tuple(value)

    def region(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(i, j, h, w) of the erased rectangle of an image of ``height`` x ``width``, or None."""
        area = height * width
        for _ in range(self.tries):
            s = self.sl + (self.sh - self.sl) * float(torch.rand(()))
            r = self.r1 + (1.0 / self.r1 - self.r1) * float(torch.rand(()))
            h = int(round(math.sqrt(s * area * r)))
            w = int(round(math.sqrt(s * area / r)))
            if h < height and w < width:
                i = int(torch.randint(0, height - h + 1, ()))
                j = int(torch.randint(0, width - w + 1, ()))
                return i, j, h, w
        return None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return img
        box = self.region(int(img.shape[-2]), int(img.shape[-1]))
        if box is None:
            return img
        i, j, h, w = box
        img = img.clone()
        if img.shape[-3] == len(self.value):
            img[..., i:i + h, j:j + w] = torch.as_tensor(self.value, dtype=img.dtype).view(-1, 1, 1)
        else:
            img[..., i:i + h, j:j + w] = self.value[0]
        return img


ERASING = ("torchvision", "released")  # the values of config key finetune.erasing


def train_transform(height: int, width: int, random_erasing: float = 0.0, erasing: str = "torchvision") -> v2.Compose:
    """Training augmentation: PIL image -> float32 tensor [3, height, width]. ``erasing``: the random
    erasing law (``torchvision`` or ``released``, see the module docstring)."""
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
    if erasing not in ERASING:
        raise ValueError(f"erasing must be one of {', '.join(ERASING)}, got {erasing!r}")
    steps: list[v2.Transform] = [
        v2.Resize((height, width), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Pad(PAD, fill=0),
        v2.RandomCrop((height, width)),
        *_to_normalised_tensor(),
    ]
    if random_erasing > 0 and erasing == "released":
        steps.append(ReleasedErasing(p=random_erasing))
    elif random_erasing > 0:
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
