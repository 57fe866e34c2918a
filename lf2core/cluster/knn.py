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


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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


#: from this dimension up the CPU torch backend computes each product once (``symmetric``): the product is
#: then worth more than the slower column-wise ``topk`` that the transposed half needs (measured: ~10-15 ns
#: per element against ~2d / (sgemm rate) for recomputing it)
SYMMETRIC_MIN_DIM = 1024
#: rows of the ``[rows, 2 (k + 1)]`` merges of the symmetric search, per call (bounds their temporaries)
MERGE_ROWS = 16384


def _finish_rows(v: np.ndarray, i: np.ndarray, k: int, x: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of rows ``a, a+1, ...`` from their top-``kq`` (``kq = k + 1`` unless ``k = N``)
    similarities ``v`` / indices ``i`` (any order among equal values): ordered by (decreasing similarity,
    increasing index); a row whose ``k``-th and ``k+1``-th similarities are equal (a tie across the cut) is
    redone with a stable sort of its float32 products, so the lowest tied indices are kept."""
    order = np.lexsort((i, -v), axis=-1)
    v, i = np.take_along_axis(v, order, axis=1), np.take_along_axis(i, order, axis=1)
    if v.shape[1] > k:
        for r in np.flatnonzero(v[:, k - 1] == v[:, k]):  # rare (duplicated features)
            row = x @ x[a + r]
            i[r, :k] = np.argsort(-row, kind="stable")[:k]
            v[r, :k] = row[i[r, :k]]
        v, i = v[:, :k], i[:, :k]
    return v, i


def _merge(run_v, run_i, j0: int, v, i, kq: int) -> None:
    """Rows ``j0..`` of the running top-``kq`` lists ``run_v`` / ``run_i`` := the top ``kq`` of themselves and
    the candidates ``v`` / ``i`` (``[rows, c]``, -inf padded), in slices of ``MERGE_ROWS`` rows."""
    import torch

    for m in range(0, v.shape[0], MERGE_ROWS):
        a, b = j0 + m, j0 + min(v.shape[0], m + MERGE_ROWS)
        mv, pos = torch.topk(torch.cat([run_v[a:b], v[m : m + b - a]], 1), kq, dim=1, sorted=False)
        run_i[a:b] = torch.gather(torch.cat([run_i[a:b], i[m : m + b - a]], 1), 1, pos)
        run_v[a:b] = mv


def _merge_above(run_v, run_i, j0: int, block, r0: int, kq: int) -> None:
    """Columns ``j0 + c`` of ``block`` ``[rows, N - j0]`` (products of rows ``r0..`` with them) into the running
    lists: only entries strictly above a column's current ``kq``-th best value can be among its final top
    ``kq`` (an entry equal to it leaves that value's multiplicity at the cut unchanged, so the tie rule of
    :func:`_finish_rows` still sees it). After the first block these are a few per column, so this replaces
    a column-wise ``topk`` over every block by one comparison pass and a small merge."""
    import torch

    thresh = run_v[j0:].amin(dim=1)  # [N - j0]
    r, c = torch.nonzero(block > thresh, as_tuple=True)
    if r.numel() == 0:
        return
    order = torch.argsort(c, stable=True)
    r, c = r[order], c[order]
    hit, counts = torch.unique_consecutive(c, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(c.numel(), device=c.device) - torch.repeat_interleave(starts, counts)
    width = int(counts.max())
    pv = torch.full((hit.numel(), width), -float("inf"), dtype=block.dtype, device=block.device)
    pi = torch.full((hit.numel(), width), -1, dtype=torch.int64, device=block.device)
    row_of = torch.repeat_interleave(torch.arange(hit.numel(), device=c.device), counts)
    pv[row_of, slot] = block[r, c]
    pi[row_of, slot] = r + r0
    cols = hit + j0
    mv, pos = torch.topk(torch.cat([run_v[cols], pv], 1), kq, dim=1, sorted=False)
    run_i[cols] = torch.gather(torch.cat([run_i[cols], pi], 1), 1, pos)
    run_v[cols] = mv


def _knn_torch(x: np.ndarray, k: int, chunk_size: int, progress: bool, index_dtype=np.int64,
               symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blocked exact search: for each block of ``chunk_size`` query rows one ``[rows, d] @ [d, N]``
    product into a preallocated float32 buffer, then ``topk(k + 1)`` (one more than asked, to see a tie
    across the cut; see :func:`_finish_rows` for the tie rule).

    ``symmetric``: block ``[a, b)`` computes only ``X[a:b] @ X[a:].T`` (half the products in all): its rows
    give rows ``a..b-1`` their neighbours among ``j >= a``; its columns ``j >= b`` give row ``j`` a
    top-``(k+1)`` among ``a..b-1`` (column-wise ``topk``), merged into a running ``[N, k+1]`` list that
    completes row ``j`` when its own block comes.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = x.shape[0]
    base = torch.from_numpy(x).to(device)  # no copy on CPU
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=index_dtype)
    kq = min(k + 1, n)
    cs = min(chunk_size, n)
    flat = torch.empty(cs * n, dtype=torch.float32, device=device)
    if symmetric:
        run_v = torch.full((n, kq), -float("inf"), dtype=torch.float32, device=device)
        run_i = torch.full((n, kq), -1, dtype=torch.int64, device=device)
    with torch.no_grad():
        for a in tqdm(range(0, n, cs), desc=f"knn (torch-{device.type})", disable=not progress, unit="chunk"):
            b = min(n, a + cs)
            c0 = a if symmetric else 0
            s = flat[: (b - a) * (n - c0)].view(b - a, n - c0)
            torch.mm(base[a:b], base[c0:].T, out=s)  # [rows, N - c0]
            v, i = torch.topk(s, min(kq, n - c0), dim=1, largest=True, sorted=False)
            if symmetric:
                i += c0
                v, pos = torch.topk(torch.cat([run_v[a:b], v], 1), kq, dim=1, sorted=False)
                i = torch.gather(torch.cat([run_i[a:b], i], 1), 1, pos)
                if b < n and a == 0:  # columns j >= b: their top-(k+1) among rows a..b-1, into the running lists
                    cv, ci = torch.topk(s[:, b - a:], min(kq, b - a), dim=0, sorted=False)  # [kc, N - b]
                    _merge(run_v, run_i, b, cv.T, ci.T + a, kq)
                elif b < n:  # later blocks: only products above a column's current (k+1)-th best can enter
                    _merge_above(run_v, run_i, b, s[:, b - a:], a, kq)
            v, i = v.cpu().numpy(), i.cpu().numpy()
            if np.any(i < 0) or not np.isfinite(v).all():
                raise ValueError("knn: inner products overflow float32 (features too large to compare)")
            sims[a:b], idx[a:b] = _finish_rows(v, i, k, x, a)
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
    symmetric: Optional[bool] = None,
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
        symmetric: torch backend only: compute each inner product once and use it for both rows (half the
            multiply-adds, a slower column-wise ``topk`` for the transposed half). ``None`` (default): on
            CPU when ``d >= SYMMETRIC_MIN_DIM``.

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
        if symmetric is None:  # pragma: no branch
            symmetric = x.shape[1] >= SYMMETRIC_MIN_DIM and not _torch_cuda()
        sims, idx = _knn_torch(x, k, int(chunk_size or torch_block_rows(n)), progress, index_dtype,
                               bool(symmetric))
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
