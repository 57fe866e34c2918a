"""Datasets and DataLoaders over lists of ``Sample``.

- ``ImageDataset(samples, transform, labels=None)``: item i -> ``(image, label, camid, index)`` where
  image is ``transform(PIL RGB image)`` (a float tensor [3, H, W] with the lf2 transforms), label is
  ``labels[i]`` when given (pseudo / relabelled ids) else ``samples[i].pid``.
- ``train_loader``: identity-balanced P x K batches (``IdentityBatchSampler``); a batch is
  ``(images [B,3,H,W] float32, labels [B] int64, camids [B] int64, indices [B] int64)``.
- ``test_loader``: the samples in order, same batch layout.

Workers are persistent only when ``num_workers > 0``; memory is pinned only when CUDA is available.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .datasets import Sample, relabel
from .samplers import IdentityBatchSampler


MAX_IMAGE_PIXELS = 1 << 26  # 67 Mpx: far above any person crop; bigger headers are refused before decoding


def load_image(path: str):
    """Open ``path`` as a PIL RGB image; DataError naming the file if it cannot be read, or if its header
    declares more than ``MAX_IMAGE_PIXELS`` pixels (a corrupt or hostile file would exhaust memory)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: image header declares {im.width}x{im.height} pixels, over the limit of "
                                f"{MAX_IMAGE_PIXELS} for a person crop; the file is corrupt or not a crop")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


class ImageDataset(Dataset):
    """Map-style dataset over samples: item -> (image, label: int, camid: int, index: int)."""

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable[[Any], Any]] = None,
                 labels: Optional[Sequence[int] | np.ndarray] = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != len(self.samples):
                raise DataError(f"ImageDataset: {len(labels)} labels for {len(self.samples)} samples")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int, int]:
        s = self.samples[index]
        img = load_image(s.path)
        if self.transform is not None:
            img = self.transform(img)
        label = int(self.labels[index]) if self.labels is not None else int(s.pid)
        return img, label, int(s.camid), int(index)


def _loader_kwargs(num_workers: int) -> dict[str, Any]:
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }


def train_loader(
    samples: Sequence[Sample],
    labels: Optional[Sequence[int] | np.ndarray],
    transform: Callable[[Any], Any],
    batch_size: int,
    num_instances: int,
    num_batches: int,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader of ``num_batches`` P x K batches per epoch.

    ``labels`` [N]: the identity of each sample used for sampling and returned as label (pseudo labels;
    < 0 never sampled); None -> ``relabel(samples)`` (pids mapped to 0..n-1). The random augmentation is
    seeded from ``seed`` too (the loader's generator), so a run is reproducible for a fixed worker count.
    """
    if labels is None:
        labels = relabel(list(samples))
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
    sampler = IdentityBatchSampler(labels, camids, batch_size, num_instances, num_batches, seed)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(ImageDataset(samples, transform, labels), batch_sampler=sampler, generator=gen,
                      **_loader_kwargs(num_workers))


def test_loader(samples: Sequence[Sample], transform: Callable[[Any], Any], batch_size: int,
                num_workers: int = 0) -> DataLoader:
    """DataLoader over ``samples`` in order (no shuffle, last partial batch kept); labels are the pids."""
    return DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=False, drop_last=False,
                      **_loader_kwargs(num_workers))


test_loader.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into one
