"""Seeded loaders of a fine-tuning round: batches that are a function of (seed, round, epoch, label set,
batch number) only, whatever the number of workers and wherever a resumed epoch starts."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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
    sampler: str = "balanced",
    shard: tuple[int, int] = (0, 1),
) -> list[DataLoader]:
    """One loader per label set for ``epoch`` of ``round_index``, from batch ``start``: identity-balanced
    P x K batches (``sampler="balanced"``) or the released code's sampling (``"released"``,
    ``lf2core.data.samplers.ReleasedBatchSampler``).

    The batches (identities, images, augmentation) are a function of (seed, round, epoch, label set,
    batch number) only. ``shard=(rank, world_size)``: this rank's contiguous slice of every batch
    (``lf2core.data.samplers.RankSlice``, taken after the per-image seeds are drawn: the slices of all ranks
    are the one-process batch, augmentation included).
    """
    from ..data.loaders import ImageDataset
    from ..data.samplers import RankSlice, batch_sampler

    camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
    loaders = []
    for k, labels in enumerate(label_sets):
        sampler_seed = int(np.random.SeedSequence(_seed_words(seed, round_index, k, 17)).generate_state(1)[0])
        base = batch_sampler(sampler, labels, camids, batch_size, num_instances, iters_per_epoch, sampler_seed)
        base.set_epoch(epoch)
        seeded: Any = SeededBatchSampler(base, (seed, round_index, epoch, k, 29), start)
        if shard[1] > 1:
            seeded = RankSlice(seeded, *shard)
        ds = SeededDataset(ImageDataset(samples, transform, labels))
        loaders.append(
            DataLoader(ds, batch_sampler=seeded, num_workers=num_workers, pin_memory=torch.cuda.is_available())
        )
    return loaders

