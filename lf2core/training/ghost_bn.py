"""Ghost batch norm: BatchNorm layers that normalise each sub-batch of a concatenated batch (and, with a
group size, each group of rows) with its own statistics, exactly as separate train-mode forwards would
(``ghost_batchnorm``, ``bn_groups``). Used by the fine-tuning step (``lf2core.training.step``) and pretraining."""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import synced_batch_norm


def _ghost_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over ``x`` [sum(sizes), C, ...] as separate train-mode calls on each sub-batch (and, with a
    group size, on each group of a sub-batch; see ``ghost_batchnorm``)."""
    sizes, group = self._lf2_ghost_sizes, self._lf2_ghost_group
    if not (self.training and self.track_running_stats) or x.shape[0] != sum(sizes):
        return self._lf2_plain_forward(x)
    if len(sizes) == 1 and not (0 < group < sizes[0]) and self._lf2_ghost_sync is None:
        return self._lf2_plain_forward(x)
    self._check_input_dim(x)
    outs = []
    for chunk in torch.split(x, sizes, dim=0):
        if self._lf2_ghost_sync is not None:
            outs.append(synced_batch_norm(self, chunk, self._lf2_ghost_sync))
            continue
        # what nn.BatchNorm.forward does in train mode, once per sub-batch: count, then normalise with the
        # sub-batch statistics and move the running statistics by one momentum step
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if 0 < group < chunk.shape[0]:
            # nn.DataParallel: every replica normalises its own slice; only the first replica's running
            # statistics survive (the other replicas update copies that are thrown away)
            parts = torch.split(chunk, group, dim=0)
            outs.append(F.batch_norm(parts[0], self.running_mean, self.running_var, self.weight, self.bias, True,
                                     factor, self.eps))
            outs += [F.batch_norm(q, None, None, self.weight, self.bias, True, 0.0, self.eps) for q in parts[1:]]
        else:
            outs.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                                     factor, self.eps))
    return torch.cat(outs, dim=0)


@contextlib.contextmanager
def ghost_batchnorm(modules: Sequence[nn.Module], sizes: Sequence[int], group: int = 0,
                    sync: Optional[Any] = None) -> Iterator[None]:
    """Within the block, every train-mode BatchNorm layer of ``modules`` that receives a batch of
    ``sum(sizes)`` rows treats it as ``len(sizes)`` independent sub-batches (``torch.split`` sizes): the
    output of each sub-batch is normalised with its own batch statistics and the running statistics are
    updated once per sub-batch, in order -- the same outputs and buffers as separate forwards of the
    sub-batches. Inputs of another batch size, eval-mode layers and layers without running statistics are
    left to the normal forward.

    ``group`` > 0 (and smaller than a sub-batch): each sub-batch is further cut into consecutive groups of
    ``group`` rows (the last may be smaller), each normalised with its own statistics, and the running
    statistics (and the counter, once) are updated from the FIRST group only -- what ``nn.DataParallel``
    over ``sub-batch / group`` GPUs does (the released code: 2 GPUs, groups of 32 of a 64 batch).

    ``sync`` (an active ``lf2core.distributed.Dist``, no-grad forwards only): each sub-batch is normalised
    with the statistics of its rows on ALL ranks (the Fuse under data parallelism, and every BN layer
    with ``distributed.sync_bn``; see ``fast_step``); ``group`` is then ignored.
    """
    sizes = [int(s) for s in sizes]
    patched: list[nn.Module] = []
    try:
        for root in modules:
            for m in root.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(m, "_lf2_ghost_sizes"):
                    m._lf2_ghost_sizes = sizes
                    m._lf2_ghost_group = int(group)
                    m._lf2_ghost_sync = sync if sync is not None and sync.active else None
                    m._lf2_plain_forward = m.forward
                    m.forward = types.MethodType(_ghost_bn_forward, m)
                    patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
            del m._lf2_plain_forward
            del m._lf2_ghost_sizes
            del m._lf2_ghost_group
            del m._lf2_ghost_sync


def bn_groups(modules: Sequence[nn.Module], batch_size: int, group: int) -> contextlib.AbstractContextManager:
    """BatchNorm of ``modules`` over groups of ``group`` rows of a ``batch_size`` batch, running statistics
    from the first group (``ghost_batchnorm`` with one sub-batch); a no-op for ``group`` 0 or >= the batch."""
    if 0 < group < batch_size:
        return ghost_batchnorm(modules, [batch_size], group)
    return contextlib.nullcontext()
