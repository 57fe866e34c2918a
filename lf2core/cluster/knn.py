"""Exact k-nearest neighbours by inner product, in O(N*k) memory beyond the features.

Backends:

- ``faiss``: ``faiss.knn`` (exact, blocked BLAS inner products) on CPU; on GPU (``faiss.knn_gpu``) when
  the installed faiss has GPUs.
- ``torch``: chunked ``queries @ features.T`` + ``topk`` on CUDA when available, else CPU.

Queries are processed in chunks of ``chunk_size`` rows, so the only O(N)-sized outputs are the two
``[N, k]`` result arrays; no ``N x N`` matrix ever exists.
"""

from __future__ import annotations

import os
import sys
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm

Backend = Literal["auto", "faiss", "torch"]


def _as_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Validate a 2-D finite float matrix and return it as C-contiguous float32 ``[N, d]``."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, d], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point features, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        return False
    return True


def _auto_backend() -> str:
    """faiss on GPU if it has GPUs; else torch on CUDA if available; else faiss (CPU); else torch (CPU)."""
    if _faiss_available():
        import faiss

        if hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU here
            return "faiss"
    # importing torch costs ~0.5 GB of RSS: only look for CUDA when torch is loaded or a GPU exists
    if "torch" in sys.modules or os.path.exists("/dev/nvidia0"):
        try:
            import torch

            if torch.cuda.is_available():  # pragma: no cover - no GPU here
                return "torch"
        except ImportError:  # pragma: no cover
            pass
    return "faiss" if _faiss_available() else "torch"


def _knn_faiss(x: np.ndarray, k: int, chunk_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    n = x.shape[0]
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    use_gpu = hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0
    res = faiss.StandardGpuResources() if use_gpu else None
    for a in tqdm(range(0, n, chunk_size), desc="knn (faiss%s)" % ("-gpu" if use_gpu else ""),
                  disable=not progress, unit="chunk"):
        q = x[a : a + chunk_size]
        if use_gpu:  # pragma: no cover - no GPU on the CI machine
            d, i = faiss.knn_gpu(res, q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        sims[a : a + len(q)] = d
        idx[a : a + len(q)] = i
    return sims, idx


def _knn_torch(x: np.ndarray, k: int, chunk_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = x.shape[0]
    base = torch.from_numpy(x).to(device)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for a in tqdm(range(0, n, chunk_size), desc=f"knn (torch-{device.type})", disable=not progress,
                      unit="chunk"):
            s = base[a : a + chunk_size] @ base.T  # [chunk, N]
            v, i = torch.topk(s, k, dim=1, largest=True, sorted=True)
            sims[a : a + s.shape[0]] = v.cpu().numpy()
            idx[a : a + s.shape[0]] = i.cpu().numpy()
            del s
    return sims, idx


def knn(
    features: np.ndarray,
    k: int,
    *,
    backend: Backend = "auto",
    chunk_size: Optional[int] = None,
    self_first: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row of ``features`` among all rows, by inner product.

    Args:
        features: ``[N, d]`` float array (L2-normalised for cosine neighbours).
        k: neighbours per row, ``1 <= k <= N`` (the row itself counts as one of them).
        backend: ``"faiss"``, ``"torch"`` or ``"auto"`` (faiss-GPU, else torch-CUDA, else faiss-CPU).
        chunk_size: query rows per block (default: 4096 for faiss; for torch, enough rows that a
            ``[chunk, N]`` float32 block is ~256 MiB).
        self_first: guarantee ``indices[i, 0] == i`` (the k-reciprocal semantics need "i itself first").
            With distinct features this is what the search returns anyway; with duplicated rows a tie
            could put a twin first, in which case ``i`` is moved to the front and the rest shifted.
        progress: show a tqdm bar over chunks.

    Returns:
        ``(similarities [N, k] float32, indices [N, k] int64)``, each row sorted by decreasing similarity.
    """
    x = _as_features(features)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"knn: k must be an integer in [1, N={n}], got {k!r}")
    k = int(k)
    if backend == "auto":
        backend = _auto_backend()
    if backend == "faiss":
        sims, idx = _knn_faiss(x, k, chunk_size or 4096, progress)
    elif backend == "torch":
        cs = chunk_size or max(1, min(n, (256 << 20) // (4 * n)))
        sims, idx = _knn_torch(x, k, cs, progress)
    else:
        raise ValueError(f"knn: unknown backend {backend!r} (expected auto, faiss or torch)")
    if self_first:
        sims, idx = _force_self_first(x, sims, idx)
    return sims, idx


def _force_self_first(x: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put row ``i`` at column 0 of its own neighbour list (vectorised; a no-op for distinct features)."""
    n, k = idx.shape
    rows = np.arange(n, dtype=np.int64)
    bad = idx[:, 0] != rows
    if not bad.any():
        return sims, idx
    b = rows[bad]
    cand = np.concatenate([b[:, None], idx[bad]], axis=1)  # [m, k+1]: self, then the search result
    self_sim = np.einsum("ij,ij->i", x[b], x[b])
    cand_sims = np.concatenate([self_sim[:, None].astype(np.float32), sims[bad]], axis=1)
    # order key: the prepended self first, the search's own copy of self last, others in search order
    key = np.broadcast_to(np.arange(k + 1), cand.shape).copy()
    key[:, 1:][idx[bad] == b[:, None]] = k + 1
    key[:, 0] = -1
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    sims, idx = sims.copy(), idx.copy()
    idx[bad] = np.take_along_axis(cand, order, axis=1)
    sims[bad] = np.take_along_axis(cand_sims, order, axis=1)
    return sims, idx
