"""Data-parallel training across processes (``torchrun``): process group, ranks, barriers, gathers.

A stage started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment: ``--nproc-per-node N`` on one
machine, or Kubeflow Trainer across nodes) calls ``setup(cfg, stage)`` once: it joins the process group
(NCCL on CUDA, gloo on CPU; ``distributed.backend``), with ``distributed.timeout_s`` as the timeout of
every collective, pins CUDA device ``LOCAL_RANK``, and quiets the ranks other than 0 (logging at WARNING,
no progress bars). Without ``WORLD_SIZE`` > 1 it returns ``Dist()`` (one process) and nothing changes.

``Dist`` (what a stage needs): ``rank``, ``world_size``, ``main`` (rank 0: the only one that logs,
evaluates and writes), ``barrier(what)`` (a one-line ``DistributedError`` naming the stage, the rank and the
point after ``timeout_s`` when another rank never arrives), ``gather_rows(parts)`` (the per-rank shards of
an array concatenated in rank order on rank 0), ``all_gather_cat(t)`` (a tensor's per-rank slices in
rank order on every rank, the local slice keeping its autograd graph), ``sum_gradients(params)`` and
``broadcast_buffers(modules)``. ``docs/distributed.md`` has the semantics and the measured equivalence.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import Lf2Error

log = logging.getLogger(__name__)

_CONTROL: Any = None  # gloo group for barriers and object gathers (= the world group on gloo)


class DistributedError(Lf2Error):
    """A rank failed, hung or timed out; the message names the stage, the rank and where it waited."""


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun, Kubeflow Trainer); 1 when unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DistributedError(f"environment WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank ``rank`` of ``world_size`` (1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    stage: str = ""
    timeout_s: float = 1800.0
    sync_bn: bool = False  # distributed.sync_bn: student/teacher (source model) BN over all ranks

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def where(self) -> str:
        return f"{self.stage}: rank {self.rank} of {self.world_size}"

    # ------------------------------------------------------------------ synchronisation
    def barrier(self, what: str) -> None:
        """Wait for every rank at point ``what``; ``DistributedError`` (one line) after ``timeout_s``."""
        if not self.active:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=_CONTROL, timeout=datetime.timedelta(seconds=self.timeout_s))
        except (RuntimeError, dist.DistError) as e:
            raise DistributedError(
                f"{self.where()} waited more than {self.timeout_s:g} s (distributed.timeout_s) at '{what}' for "
                f"the other ranks; a rank failed or hangs, see its log ({_first_line(e)})") from None

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failed collective inside the block (a peer died, a timeout) into one clear line."""
        if not self.active:
            yield
            return
        import torch.distributed as dist

        try:
            yield
        except (dist.DistError, RuntimeError) as e:
            if not isinstance(e, dist.DistError) and not _is_collective_error(e):
                raise
            raise DistributedError(
                f"{self.where()}: a collective failed during '{what}' (timeout distributed.timeout_s="
                f"{self.timeout_s:g} s); a rank failed or hangs, see its log ({_first_line(e)})") from None

    def check_same(self, value: Any, what: str) -> None:
        """``DistributedError`` unless every rank holds the same (picklable) ``value``."""
        if not self.active:
            return
        import torch.distributed as dist

        got: list[Any] = [None] * self.world_size
        dist.all_gather_object(got, value, group=_CONTROL)
        if any(v != got[0] for v in got):
            raise DistributedError(f"{self.where()}: ranks disagree on {what}: {got}")

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=_CONTROL)
        return box[0]

    # ------------------------------------------------------------------ data
    def shard(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of ``n`` items (shares differ by at most one,
        lower ranks first): the shards in rank order are ``0..n-1`` in order."""
        base, extra = divmod(int(n), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def gather_rows(self, part: dict[str, np.ndarray]) -> Optional[dict[str, np.ndarray]]:
        """Rank 0: every rank's ``part`` (same keys, rows along axis 0) concatenated in rank order; other
        ranks: None."""
        if not self.active:
            return part
        import torch.distributed as dist

        parts: Optional[list[Any]] = [None] * self.world_size if self.main else None
        dist.gather_object(part, parts, dst=0, group=_CONTROL)
        if not self.main:
            return None
        assert parts is not None
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in part}

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` [b, ...] (same shape on every rank) concatenated along dim 0 in rank order
        [world_size * b, ...]; the local slice is ``t`` itself (autograd flows into it), the others are
        detached copies. Every rank computes a loss on the same concatenation, so the sum over ranks of
        the local gradients (``sum_gradients``) is the gradient of that loss on one process."""
        if not self.active:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[self.rank] = t
        return torch.cat(parts, dim=0)

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """``p.grad`` := the sum over ranks of ``p.grad`` (one flat all-reduce per dtype and device)."""
        if not self.active:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for key in sorted(groups, key=str):  # the same order on every rank
            grads = groups[key]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(r)

    def broadcast_buffers(self, modules: Sequence[nn.Module]) -> None:
        """Every rank's buffers (BN running statistics, counters) := rank 0's (as ``nn.DataParallel``
        keeps the first replica's and DDP broadcasts rank 0's)."""
        if not self.active:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for m in modules:
            for b in m.buffers():
                groups.setdefault((b.dtype, b.device), []).append(b)
        for key in sorted(groups, key=str):
            bufs = groups[key]
            flat = _flatten_dense_tensors([b.detach() for b in bufs])
            dist.broadcast(flat, src=0)
            for b, r in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                b.data.copy_(r)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (in place, returned)."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


_COLLECTIVE_MARKS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "processgroup")


def _is_collective_error(e: BaseException) -> bool:
    """A RuntimeError raised by a collective (gloo reports a dead peer as a plain RuntimeError)."""
    text = str(e).lower()
    return any(m in text for m in _COLLECTIVE_MARKS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def setup(cfg: Any, stage: str) -> Dist:
    """Join the process group when started with ``WORLD_SIZE`` > 1 (idempotent); ``Dist()`` otherwise."""
    global _CONTROL
    world = env_world_size()
    timeout = float(getattr(getattr(cfg, "distributed", None), "timeout_s", 1800.0))
    if world <= 1:
        return Dist(stage=stage, timeout_s=timeout)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_initialized():
        backend = getattr(getattr(cfg, "distributed", None), "backend", "auto")
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise DistributedError(f"{stage}: distributed.backend nccl needs CUDA, none on this machine")
            torch.cuda.set_device(local_rank)
        td = datetime.timedelta(seconds=timeout)
        try:
            dist.init_process_group(backend, timeout=td)
        except (RuntimeError, ValueError, dist.DistError) as e:
            raise DistributedError(f"{stage}: rank {rank} of {world} cannot join the process group "
                                   f"({backend}; MASTER_ADDR/MASTER_PORT from torchrun): {_first_line(e)}") from None
        _CONTROL = dist.new_group(backend="gloo", timeout=td) if backend != "gloo" else None
    sync_bn = bool(getattr(getattr(cfg, "distributed", None), "sync_bn", False))
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank, stage, timeout, sync_bn)
    if not d.main:
        logging.getLogger().setLevel(logging.WARNING)
        os.environ["LF2_PROGRESS"] = "0"
    log.info("%s: %d processes (backend %s, timeout %g s)", stage, d.world_size, dist.get_backend(), timeout)
    return d


def device_policy(cfg: Any, d: Dist) -> Any:
    """``DevicePolicy.from_config(cfg)`` on this rank's device: ``cuda:<LOCAL_RANK>`` when the config asks
    for CUDA (or ``auto`` finds it) under torchrun, else ``cfg.device``."""
    from .runtime import DevicePolicy, select_device

    spec = cfg.device
    if d.active and cfg.device != "cpu" and torch.cuda.is_available():
        spec = f"cuda:{d.local_rank}"
    return DevicePolicy(select_device(spec), cfg.amp, getattr(cfg, "tf32", None))


def synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Train-mode BatchNorm of ``x`` [b, C, ...] with the statistics of the rows of ALL ranks (sums
    all-reduced in float64), running statistics moved by one momentum step from them: on every rank what
    one process computes on the concatenated rows. With autograd the all-reduce is differentiable
    (``torch.distributed.nn``): every rank's loss is the global loss through its own rows, the backward
    all-reduce of the statistics' gradients adds the other ranks' paths, and ``sum_gradients`` completes it."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    c = x.shape[1]
    stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), x64.new_full((1,), x.numel() / c)])
    if torch.is_grad_enabled() and stats.requires_grad and d.active:
        from torch.distributed.nn.functional import all_reduce

        stats = all_reduce(stats)
    else:
        d.all_reduce_sum(stats)
    n = stats[2 * c].detach()
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_((factor * mean).to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - factor).add_((factor * var * n / max(float(n) - 1, 1.0)).to(bn.running_var.dtype))
    shape = [1, c] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)
