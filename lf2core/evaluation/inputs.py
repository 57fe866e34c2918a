"""Input checking shared by the metrics and the distances: tensors from numpy / torch, one error type."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ..errors import Lf2Error

ArrayLike = Union[np.ndarray, torch.Tensor]


class EvaluationError(Lf2Error, ValueError):
    """Inputs to the evaluation are inconsistent (shapes, NaN distances, no valid query)."""


def as_tensor(x: ArrayLike, name: str, *, floating: bool) -> torch.Tensor:
    """A CPU tensor view of ``x`` (no copy for numpy arrays / CPU tensors of a supported dtype)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            arr = np.ascontiguousarray(np.asarray(x))
            if not arr.flags.writeable or not arr.dtype.isnative:  # read-only memmap / big-endian: copy
                arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)
            t = torch.from_numpy(arr)
        except TypeError as exc:  # object arrays, strings...
            raise EvaluationError(f"{name}: cannot convert to a numeric array ({exc})") from exc
    if floating:
        if not t.is_floating_point():
            t = t.to(torch.float64)
        elif t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
    else:
        if t.is_floating_point() or t.is_complex():
            if not torch.equal(t, t.round()):
                raise EvaluationError(f"{name}: expected integer ids, got non-integer values")
        t = t.to(torch.int64)
    return t


def check_inputs(
    distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = as_tensor(distmat, "distmat", floating=True)
    qp = as_tensor(q_pids, "q_pids", floating=False).reshape(-1)
    gp = as_tensor(g_pids, "g_pids", floating=False).reshape(-1)
    qc = as_tensor(q_camids, "q_camids", floating=False).reshape(-1)
    gc = as_tensor(g_camids, "g_camids", floating=False).reshape(-1)
    if d.dim() != 2:
        raise EvaluationError(f"distmat: expected a 2-D [num_query, num_gallery] array, got shape {tuple(d.shape)}")
    nq, ng = d.shape
    for name, t, n in (("q_pids", qp, nq), ("q_camids", qc, nq), ("g_pids", gp, ng), ("g_camids", gc, ng)):
        if t.numel() != n:
            raise EvaluationError(
                f"{name}: has {t.numel()} entries but distmat has shape {tuple(d.shape)} (expected {n})"
            )
    if nq == 0 or ng == 0:
        raise EvaluationError(f"distmat: empty problem, shape {tuple(d.shape)}")
    if torch.isnan(d).any():
        raise EvaluationError("distmat: contains NaN distances")
    return d, qp, gp, qc, gc


def to_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = as_tensor(x, name, floating=True)
    if t.dim() != 2:
        raise EvaluationError(f"{name}: expected a 2-D [N, D] feature array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise EvaluationError(f"{name}: contains NaN or infinite values")
    return t

