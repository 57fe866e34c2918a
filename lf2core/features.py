"""Batched feature extraction (no grad, flip averaging, channels_last + autocast on CUDA) and evaluation.

``extract(model_fn, loader, device, flip=True)`` runs ``model_fn`` over every batch of ``loader`` (items
``(images [B,3,H,W], pids [B], camids [B], indices [B])`` as ``lf2core.data.loaders.test_loader`` gives)
under ``torch.inference_mode``. ``model_fn(x)`` returns one tensor [B,D], a list of tensors or a dict
name -> tensor. With ``flip`` each output is ``out(x) + out(hflip(x))`` (one forward over the doubled
batch), then every output is L2-normalised row-wise in float32 — the released code's "test transform +
flip" rule. Result: ``{name: float32 [N, D], "pids": int64 [N], "camids": int64 [N]}`` in dataset
(index) order; a single tensor output is named ``features``, list outputs ``f0``, ``f1``, ...
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .runtime import DevicePolicy

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor], Any]
RANK_METRICS = ("mAP", "R1", "R5", "R10", "mINP")


def progress_enabled() -> bool:
    """tqdm bars unless ``LF2_PROGRESS=0``."""
    return os.environ.get("LF2_PROGRESS", "1") not in ("0", "false", "no")


def _named(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"features": out}
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (list, tuple)):
        return {f"f{i}": t for i, t in enumerate(out)}
    raise TypeError(f"model_fn must return a tensor, a list or a dict of tensors, got {type(out).__name__}")


def extract(
    model_fn: ModelFn,
    loader: Iterable,
    device: torch.device | str = "cpu",
    flip: bool = True,
    amp: bool = True,
    channels_last: Optional[bool] = None,
    names: Optional[Sequence[str]] = None,
    desc: str = "extract",
) -> dict[str, np.ndarray]:
    """Features of every image of ``loader`` (see the module docstring). ``names`` renames list outputs.

    ``channels_last`` defaults to True on CUDA (the model should be converted by the caller with
    ``model.to(memory_format=torch.channels_last)`` for full effect).
    """
    policy = DevicePolicy(device, amp)
    device = policy.device
    if channels_last is None:
        channels_last = policy.channels_last
    total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[attr-defined]
    chunks: dict[str, list[torch.Tensor]] = {}
    pids, camids, indices = [], [], []
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress_enabled(), leave=False)
    with torch.inference_mode():
        for batch in bar:
            images, pid, cam, idx = batch[0], batch[1], batch[2], batch[3]
            b = images.shape[0]
            x = images.to(device, non_blocking=True)
            if flip:
                x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with policy.autocast():
                outs = _named(model_fn(x))
            for name, t in outs.items():
                t = t.float()
                if flip:
                    t = t[:b] + t[b:]
                chunks.setdefault(name, []).append(F.normalize(t, dim=1).cpu())
            pids.append(torch.as_tensor(pid).reshape(-1))
            camids.append(torch.as_tensor(cam).reshape(-1))
            indices.append(torch.as_tensor(idx).reshape(-1))
    if not indices:
        raise ValueError("extract: the loader yielded no batch")
    order = torch.cat(indices).argsort()
    result: dict[str, np.ndarray] = {}
    keys = list(chunks)
    if names is not None:
        if len(names) != len(keys):
            raise ValueError(f"extract: {len(names)} names for {len(keys)} outputs")
        keys_out = list(names)
    else:
        keys_out = keys
    for k, k_out in zip(keys, keys_out):
        result[k_out] = torch.cat(chunks[k])[order].numpy().astype(np.float32, copy=False)
    result["pids"] = torch.cat(pids)[order].numpy().astype(np.int64)
    result["camids"] = torch.cat(camids)[order].numpy().astype(np.int64)
    if total is not None and len(order) != total:
        log.warning("extract: %d rows for a dataset of %d images", len(order), total)
    return result


def evaluate_samples(
    model_fn: ModelFn,
    query: Sequence[Any],
    gallery: Sequence[Any],
    height: int,
    width: int,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    amp: bool = True,
    flip: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """``mAP``, ``R1``, ``R5``, ``R10``, ``mINP`` (fractions; ``lf2core.evaluation.evaluate_features``,
    squared Euclidean) of ``model_fn`` (single-tensor output) on query/gallery ``Sample`` lists."""
    from .data.loaders import test_loader
    from .evaluation import evaluate_features
    from .data.transforms import test_transform

    tf = test_transform(height, width)
    feats = []
    for name, samples in (("query", query), ("gallery", gallery)):
        loader = test_loader(list(samples), tf, batch_size, num_workers)
        feats.append(extract(model_fn, loader, device, flip=flip, amp=amp, desc=f"{desc} {name}"))
    q, g = feats
    r = evaluate_features(q["features"], g["features"], q["pids"], g["pids"], q["camids"], g["camids"], max_rank=50)
    return {k: float(r[k]) for k in RANK_METRICS}
