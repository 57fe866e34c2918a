"""Exact k-nearest neighbours by inner product, in O(N*k) memory beyond the features.

Backends:

- ``faiss``: ``faiss.knn`` (exact, blocked BLAS inner products) on CPU; on GPU (``faiss.knn_gpu``) when
  the installed faiss has GPUs.
- ``torch``: blocked ``queries @ features.T`` into one preallocated ``[chunk, N]`` float32 buffer + ``topk``,
  on CUDA when available, else CPU. On CPU this runs near the sgemm rate of the machine (the product is
  almost all of the work; ``bench/cluster.py`` prints both), where ``faiss.knn`` (flat) ran ~4x slower.
- ``auto``: faiss-GPU if faiss sees a GPU, else torch, else faiss-CPU.

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
    """faiss on GPU if it has GPUs; else torch (CUDA when available, else the blocked CPU product, which
    runs near the machine's sgemm rate where faiss's flat CPU search does not); faiss CPU without torch."""
    if _faiss_available():
        import faiss

        if hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU here
            return "faiss"
    try:
        import torch  # noqa: F401  (~0.5 GB of RSS on import; the cluster stage has it loaded anyway)
    except ImportError:  # pragma: no cover - torch is a dependency
        return "faiss"
    return "torch"


def _knn_faiss(x: np.ndarray, k: int, chunk_size: int, progress: bool,
               index_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    n = x.shape[0]
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=index_dtype)
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


#: target size of the ``[rows, N]`` float32 similarity block of the torch backend (bytes)
TORCH_BLOCK_BYTES = 32 << 20
#: bounds on the rows of that block: fewer rows make the matrix product inefficient, more rows no faster
TORCH_BLOCK_ROWS = (128, 512)


def torch_block_rows(n: int) -> int:
    """Default query rows per block of the torch backend for ``N = n`` database rows: enough for an
    efficient ``[rows, d] @ [d, N]`` product, about ``TORCH_BLOCK_BYTES`` of output, at most ``n``."""
    lo, hi = TORCH_BLOCK_ROWS
    return max(1, min(n, hi, max(lo, TORCH_BLOCK_BYTES // (4 * n))))


def _knn_torch(x: np.ndarray, k: int, chunk_size: int, progress: bool,
               index_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Blocked exact search: for each block of ``chunk_size`` query rows one ``[rows, d] @ [d, N]``
    product into a preallocated ``[chunk_size, N]`` float32 buffer, then ``topk``.

    Ties are resolved as a stable sort of the float32 similarities would: within a row the ``k`` results
    are ordered by (decreasing similarity, increasing index), and when the ``k``-th and ``k+1``-th
    similarities are equal (a tie across the cut, seen from ``topk(k + 1)``) the row is redone with a
    stable full sort, so the lowest indices among the tied candidates are the ones kept.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = x.shape[0]
    base = torch.from_numpy(x).to(device)  # no copy on CPU
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=index_dtype)
    kq = min(k + 1, n)  # one more than asked: detects a tie across the cut
    buf = torch.empty((min(chunk_size, n), n), dtype=torch.float32, device=device)
    with torch.no_grad():
        for a in tqdm(range(0, n, chunk_size), desc=f"knn (torch-{device.type})", disable=not progress,
                      unit="chunk"):
            b = min(n, a + chunk_size)
            s = buf[: b - a]
            torch.mm(base[a:b], base.T, out=s)  # [rows, N]
            v, i = torch.topk(s, kq, dim=1, largest=True, sorted=True)
            v, i = v.cpu().numpy(), i.cpu().numpy()
            if kq > k:
                for r in np.flatnonzero(v[:, k - 1] == v[:, k]):  # rare: redo the row with a stable sort
                    row = s[r].cpu().numpy()
                    i[r, :k] = np.argsort(-row, kind="stable")[:k]
                    v[r, :k] = row[i[r, :k]]
                v, i = v[:, :k], i[:, :k]
            order = np.lexsort((i, -v), axis=-1)  # equal similarities: lower index first
            sims[a:b] = np.take_along_axis(v, order, axis=1)
            idx[a:b] = np.take_along_axis(i, order, axis=1)
    return sims, idx


def knn(
    features: np.ndarray,
    k: int,
    *,
    backend: Backend = "auto",
    chunk_size: Optional[int] = None,
    self_first: bool = True,
    progress: bool = False,
    index_dtype=np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row of ``features`` among all rows, by inner product.

    Args:
        features: ``[N, d]`` float array (L2-normalised for cosine neighbours).
        k: neighbours per row, ``1 <= k <= N`` (the row itself counts as one of them).
        backend: ``"faiss"``, ``"torch"`` or ``"auto"``: faiss-GPU if faiss sees a GPU, else torch
            (CUDA if available, else the blocked CPU product + ``topk``), else faiss-CPU.
        chunk_size: query rows per block (default: 4096 for faiss; for torch :func:`torch_block_rows`,
            128-512 rows, a ``[chunk, N]`` float32 block of ~32 MiB).
        self_first: guarantee ``indices[i, 0] == i`` (the k-reciprocal semantics need "i itself first").
            With distinct features this is what the search returns anyway; with duplicated rows a tie
            could put a twin first, in which case ``i`` is moved to the front and the rest shifted.
        progress: show a tqdm bar over chunks.
        index_dtype: ``np.int64`` (default) or ``np.int32`` (half the memory of the ``[N, k]`` indices).

    Returns:
        ``(similarities [N, k] float32, indices [N, k] index_dtype)``, each row sorted by decreasing
        similarity. The torch backend orders equal similarities by increasing index and keeps the lowest
        indices on a tie across the ``k``-th place (the order of a stable sort of the float32 products).
    """
    x = _as_features(features)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"knn: k must be an integer in [1, N={n}], got {k!r}")
    k = int(k)
    index_dtype = np.dtype(index_dtype)
    if index_dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise ValueError(f"knn: index_dtype must be int64 or int32, got {index_dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"knn: chunk_size must be a positive integer, got {chunk_size!r}")
    if backend == "auto":
        backend = _auto_backend()  # type: ignore[assignment]
    if backend == "faiss":
        sims, idx = _knn_faiss(x, k, int(chunk_size or 4096), progress, index_dtype)
    elif backend == "torch":
        sims, idx = _knn_torch(x, k, int(chunk_size or torch_block_rows(n)), progress, index_dtype)
    else:
        raise ValueError(f"knn: unknown backend {backend!r} (expected auto, faiss or torch)")
    if self_first:
        sims, idx = _force_self_first(x, sims, idx)
    return sims, idx


def _force_self_first(x: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put row ``i`` at column 0 of its own neighbour list (vectorised; a no-op for distinct features)."""
    n, k = idx.shape
    rows = np.arange(n, dtype=idx.dtype)
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
