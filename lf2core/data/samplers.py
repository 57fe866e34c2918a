"""Batch samplers of identity-labelled images: ``balanced`` (lf2's, ``IdentityBatchSampler``) and
``released`` (the released LF2 code's behaviour, ``ReleasedBatchSampler``); ``batch_sampler`` picks one.

``balanced``: an identity-balanced P x K batch sampler that prefers images from different cameras.

Each batch holds P = batch_size // num_instances distinct identities with K = num_instances images each
(a triplet loss needs positives and negatives in every batch). Identities are drawn by walking through a
shuffled list of all identities (reshuffled when used up), so after any number of batches the identities'
counts differ by at most one.
An identity's K images are taken round-robin over its cameras (cameras in random order, images shuffled
within each camera), so a batch covers min(K, #cameras) distinct cameras of that identity; only an
identity with fewer than K images repeats images (drawn with replacement from its own images).
Labels < 0 (clustering outliers) are never sampled.

``released``: see ``ReleasedBatchSampler`` (anchor + K-1 images from the anchor's other cameras, one flat
list cut into batches in order; batches are not aligned to P x K).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

SAMPLERS = ("balanced", "released")  # the values of config keys pretrain.sampler / finetune.sampler



def _checked(labels: Sequence[int] | np.ndarray, camids: Sequence[int] | np.ndarray, batch_size: int,
             num_instances: int, num_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """``labels``, ``camids`` as int64 ``[N]`` arrays; DataError for mismatched lengths or sizes < 1."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    camids = np.asarray(camids, dtype=np.int64).reshape(-1)
    if labels.shape != camids.shape:
        raise DataError(f"sampler: {labels.size} labels but {camids.size} camids")
    if num_instances < 1 or batch_size < 1:
        raise DataError(f"sampler: need batch_size ({batch_size}) >= 1 and num_instances ({num_instances}) >= 1")
    if num_batches < 1:
        raise DataError(f"sampler: num_batches must be >= 1, got {num_batches}")
    return labels, camids

class IdentityBatchSampler:
    """Batch sampler (for ``DataLoader(batch_sampler=...)``) yielding ``num_batches`` lists of indices.

    Args:
        labels: [N] int identity / pseudo labels; entries < 0 are never sampled.
        camids: [N] int camera ids.
        batch_size: images per batch; P = batch_size // num_instances identities per batch.
        num_instances: K images per identity.
        num_batches: batches per iteration over the sampler (``len()``).
        seed: the sequence of batches is a function of (seed, epoch) only. The epoch advances by one on
            every ``iter()`` (or is set with ``set_epoch``), so successive epochs differ but are reproducible.

    If there are fewer than P identities with a non-negative label, every batch uses all of them (a warning
    is logged); fewer than 2 identities raise DataError (no negatives for a triplet loss).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        camids: Sequence[int] | np.ndarray,
        batch_size: int,
        num_instances: int,
        num_batches: int,
        seed: int = 0,
    ) -> None:
        if batch_size < num_instances:
            raise DataError(f"sampler: need batch_size ({batch_size}) >= num_instances ({num_instances}) >= 1")
        labels, camids = _checked(labels, camids, batch_size, num_instances, num_batches)
        self.num_instances = int(num_instances)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.epoch = 0
        valid = np.flatnonzero(labels >= 0)
        self.identities = np.unique(labels[valid])
        if len(self.identities) < 2:
            raise DataError(
                f"sampler: {len(self.identities)} identity with a non-negative label; at least 2 are needed"
            )
        p = batch_size // num_instances
        if len(self.identities) < p:
            log.warning("sampler: only %d identities for %d per batch; using %d per batch",
                        len(self.identities), p, len(self.identities))
            p = len(self.identities)
        self.num_identities_per_batch = p
        # per identity: list of per-camera index arrays
        order = valid[np.lexsort((camids[valid], labels[valid]))]
        self._by_identity: list[list[np.ndarray]] = []
        id_bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for group in np.split(order, id_bounds):
            cam_bounds = np.flatnonzero(np.diff(camids[group])) + 1
            self._by_identity.append(np.split(group, cam_bounds))

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the batches of ``epoch``."""
        self.epoch = int(epoch)

    def _instances(self, rng: np.random.Generator, cams: list[np.ndarray]) -> list[int]:
        """K indices of one identity: round-robin over its cameras, then with replacement if too few."""
        k = self.num_instances
        queues = [list(rng.permutation(c)) for c in cams]
        queues = [queues[i] for i in rng.permutation(len(queues))]
        picked: list[int] = []
        while len(picked) < k and queues:
            for q in queues:
                if len(picked) == k:
                    break
                picked.append(int(q.pop()))
            queues = [q for q in queues if q]
        if len(picked) < k:
            pool = np.concatenate(cams)
            picked += [int(i) for i in rng.choice(pool, size=k - len(picked), replace=True)]
        return picked

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n_ids, p = len(self._by_identity), self.num_identities_per_batch
        queue: list[int] = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < p:
                if not queue:
                    # a fresh pass over all identities; those already in this batch are moved just past
                    # the ones this batch still needs, so every pass holds every identity exactly once
                    perm = [int(i) for i in rng.permutation(n_ids)]
                    taken = set(chosen)
                    free = [i for i in perm if i not in taken]
                    need = p - len(chosen)
                    queue = (free[:need] + [i for i in perm if i in taken] + free[need:])[::-1]
                chosen.append(queue.pop())
            batch: list[int] = []
            for ident in chosen:
                batch += self._instances(rng, self._by_identity[ident])
            yield batch


class ReleasedBatchSampler:
    """The released LF2 code's sampling (its multiple-gallery sampler + a ``drop_last`` DataLoader),
    written for lf2. Same interface as ``IdentityBatchSampler``.

    One *pass* walks over all identities (labels >= 0) in a random order and appends, per identity:

    - an anchor: one of its images, uniformly;
    - K-1 images (K = ``num_instances``) drawn from the identity's images whose camera differs from the
      anchor's camera; when there is none, from its other images (same camera, anchor excluded); the
      draw is without replacement when that pool holds at least K images, WITH replacement otherwise
      (so a pool of exactly K-1 images may repeat one, as released);
    - nothing more when the identity has a single image (it contributes one image, not K).

    The flat index list of a pass is cut into consecutive batches of ``batch_size``; the incomplete tail
    is dropped and the next pass (a new identity order) starts a fresh batch. A batch therefore mixes
    identity groups of K and of 1 and may split a group across two batches: it is not P x K aligned.
    The sequence of batches is a function of (seed, epoch) only (``set_epoch`` / one epoch per ``iter()``).
    A pass that cannot fill one batch raises DataError.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        camids: Sequence[int] | np.ndarray,
        batch_size: int,
        num_instances: int,
        num_batches: int,
        seed: int = 0,
    ) -> None:
        labels, camids = _checked(labels, camids, batch_size, num_instances, num_batches)
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.epoch = 0
        valid = np.flatnonzero(labels >= 0)
        order = valid[np.argsort(labels[valid], kind="stable")]
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        #: per identity: its image indices (dataset order) and their cameras
        self._members = [g for g in np.split(order, bounds) if len(g)]
        self._cams = [camids[g] for g in self._members]
        if len(self._members) < 2:
            raise DataError(f"sampler: {len(self._members)} identity with a non-negative label; at least 2 are needed")
        self.pass_length = sum(1 if len(g) == 1 else self.num_instances for g in self._members)
        if self.pass_length < self.batch_size:
            raise DataError(f"sampler: one pass over the {len(self._members)} identities gives {self.pass_length} "
                            f"images, fewer than batch_size {self.batch_size}")

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the batches of ``epoch``."""
        self.epoch = int(epoch)

    def _group(self, rng: np.random.Generator, ident: int) -> list[int]:
        """The anchor and its K-1 companions of one identity (dataset indices)."""
        members, cams = self._members[ident], self._cams[ident]
        a = int(rng.integers(len(members)))
        picked = [int(members[a])]
        pool = np.flatnonzero(cams != cams[a])
        if len(pool) == 0:
            pool = np.delete(np.arange(len(members)), a)
        if len(pool) == 0 or self.num_instances == 1:
            return picked
        k = self.num_instances - 1
        chosen = rng.choice(pool, size=k, replace=len(pool) < self.num_instances)
        return picked + [int(members[i]) for i in chosen]

    def one_pass(self, rng: np.random.Generator) -> list[int]:
        """The flat index list of one pass over all identities (random identity order)."""
        flat: list[int] = []
        for ident in rng.permutation(len(self._members)):
            flat += self._group(rng, int(ident))
        return flat

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        done = 0
        while done < self.num_batches:
            flat = self.one_pass(rng)
            for b in range(len(flat) // self.batch_size):
                yield flat[b * self.batch_size:(b + 1) * self.batch_size]
                done += 1
                if done == self.num_batches:
                    return


def batch_sampler(kind: str, labels: Sequence[int] | np.ndarray, camids: Sequence[int] | np.ndarray,
                  batch_size: int, num_instances: int, num_batches: int, seed: int = 0) -> Any:
    """``IdentityBatchSampler`` (``balanced``) or ``ReleasedBatchSampler`` (``released``)."""
    if kind == "balanced":
        return IdentityBatchSampler(labels, camids, batch_size, num_instances, num_batches, seed)
    if kind == "released":
        return ReleasedBatchSampler(labels, camids, batch_size, num_instances, num_batches, seed)
    raise ValueError(f"sampler: unknown kind {kind!r} (expected one of {', '.join(SAMPLERS)})")


class RankSlice:
    """This rank's contiguous slice of every batch of ``base`` (a batch sampler, or any iterable of lists)
    under data parallelism: rank ``rank`` of ``world_size`` takes items ``[rank*b, (rank+1)*b)`` of each
    global batch of ``world_size*b`` items, so the slices in rank order are the one-process batch.
    Every rank builds the same global batches (same seed); ``DataError`` for a batch that does not split
    evenly. ``set_epoch`` is passed on."""

    def __init__(self, base: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"sampler: rank {rank} outside 0..{world_size - 1}")
        self.base = base
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[list]:
        for batch in self.base:
            b, rest = divmod(len(batch), self.world_size)
            if rest:
                raise DataError(f"sampler: a batch of {len(batch)} images does not split over {self.world_size} "
                                f"processes; use a batch_size divisible by WORLD_SIZE")
            yield list(batch[self.rank * b:(self.rank + 1) * b])
