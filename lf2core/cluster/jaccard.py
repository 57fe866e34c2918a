"""Sparse, vectorised k-reciprocal Jaccard distance (the SpCL / re-ranking "jaccard_dist").

Semantics (docs/method.md, section 5, "DBSCAN on the k-reciprocal Jaccard distance"), X = L2-normalised
features ``[N, d]``:

1. ``initial_rank[i]`` = the ``k1`` nearest neighbours of ``i`` by inner product, ``i`` itself first.
2. ``R(i, k) = {j in initial_rank[i, :k+1] : i in initial_rank[j, :k+1]}``.
3. ``E(i) = R(i, k1)``, and for each ``c in R(i, k1)`` with ``Rc = R(c, round(k1/2))``:
   if ``|Rc ∩ R(i, k1)| > 2/3 |Rc|`` then ``E(i) ∪= Rc``.
4. ``V[i, E(i)] = softmax over E(i) of -(2 - 2 x_i.x_j)``.
5. if ``k2 != 1``: ``V[i] := mean of V[j] for j in initial_rank[i, :k2]``.
6. ``jaccard(i, j) = 1 - m / (2 - m)``, ``m = sum_c min(V[i, c], V[j, c])``, clipped below at 0.

How it is computed without any ``N x N`` array or per-row Python loop:

- the kNN search (``lf2core.cluster.knn``) is the only O(N^2 d) part; everything after it works on
  arrays of O(N k) pairs encoded as int64 keys ``i * N + j``;
- reciprocity (2) is a sorted-key membership test (``searchsorted``) of each pair's reverse key;
- expansion (3): with ``M1[i, j] = [j in R(i, k1)]`` and ``Mh[c, j] = [j in R(c, round(k1/2))]`` the
  intersection sizes are ``(M1 @ Mh.T)[i, c]`` and ``E = pattern(M1 + P @ Mh)`` (P = passing ``(i, c)``),
  sparse products in scipy's C++ kernels;
- V (4) is a CSR matrix; the softmax is a segmented max/sum (``reduceat``) over its rows; similarities
  come from the kNN result when the pair is there, else from a chunked row-wise dot product;
- the query expansion (5) is one sparse product ``A @ V`` with ``A[i, initial_rank[i, :k2]] = 1/k2``;
- the min-sum (6) uses V's columns as inverted lists: for every stored ``V[i, c]`` and every row
  ``j >= i`` of column ``c`` it emits ``min(V[i, c], V[j, c])``, in blocks of rows; the block's distinct
  pairs come from a byte mask (already in sorted order) and their sums from one ``bincount``; the lower
  triangle is the mirror (see :func:`jaccard_from_v`). Work: O(sum over columns of count^2 / 2) terms
  (half of ~3,400 per row at k1=30, k2=6) plus a scan of N^2 mask bytes in total (1e10 at N = 100k:
  seconds, next to the O(N^2 d) kNN).

The result stores exactly the pairs that share a column of V (the diagonal included, value 0); every
absent pair has distance 1, as in the dense reference.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .knn import _as_features, _auto_backend, knn
from .minsum import _segment_starts, jaccard_from_v

log = logging.getLogger(__name__)

#: target float32 elements gathered per chunk of the fallback dot products
DOT_CHUNK_ELEMS = 8_000_000


# ------------------------------------------------------------------------------------------ helpers
def normalize_rows(features: np.ndarray) -> np.ndarray:
    """``features`` as float32 ``[N, d]`` with unit rows (returned as is when already normalised)."""
    x = _as_features(features)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if np.any(norms == 0):
        raise ValueError(f"features: {int(np.sum(norms == 0))} all-zero row(s) cannot be L2-normalised")
    if np.max(np.abs(norms - 1.0)) <= 1e-5:
        return x
    return (x / norms[:, None]).astype(np.float32)


#: rows per chunk of the reciprocity test (its temporaries are ``[chunk, k+1, k+1]`` booleans)
RECIPROCAL_CHUNK_ROWS = 8192


def reciprocal_pairs(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``R(i, k)`` for all ``i`` as pairs ``(rows, cols)`` (int64), rows ascending, each row in rank order.

    Args:
        rank: ``[N, K]`` int32 or int64 neighbour indices, row ``i`` starting with ``i``.
        k: the slice ``rank[:, :k+1]`` (cut at the K columns there are) defines the forward lists.

    ``j = rank[i, t]`` is kept when ``i`` is among ``rank[j, :k+1]``: a ``[rows, k+1, k+1]`` comparison,
    ``RECIPROCAL_CHUNK_ROWS`` rows at a time.
    """
    n, kk = rank.shape
    w = min(k + 1, kk)
    out_r, out_c = [], []
    for a in range(0, n, RECIPROCAL_CHUNK_ROWS):
        b = min(n, a + RECIPROCAL_CHUNK_ROWS)
        fwd = rank[a:b, :w]  # [rows, w]
        rows = np.arange(a, b, dtype=fwd.dtype)
        keep = (rank[fwd, :w] == rows[:, None, None]).any(axis=2)  # [rows, w]
        r, t = np.nonzero(keep)
        out_r.append(r.astype(np.int64) + a)
        out_c.append(fwd[r, t].astype(np.int64))
    return np.concatenate(out_r), np.concatenate(out_c)


def _pattern(rows: np.ndarray, cols: np.ndarray, n: int, dtype=np.float32) -> sp.csr_matrix:
    """``N x N`` CSR with ones at ``(rows, cols)`` (pairs unique), sorted indices."""
    m = sp.csr_matrix((np.ones(len(rows), dtype=dtype), (rows, cols)), shape=(n, n))
    m.sort_indices()
    return m


def _pair_similarities(x: np.ndarray, e: sp.csr_matrix, sims: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``x_i . x_j`` (float64) for the stored pairs of ``e`` (CSR order): read from the kNN result where
    ``j`` is among the neighbours of ``i`` (C++ sparse sampling), computed by chunked dot products else."""
    n, kk = rank.shape
    knn_sim = sp.csr_matrix((sims.reshape(-1).astype(np.float64),
                             (np.repeat(np.arange(n, dtype=np.int64), kk), rank.reshape(-1))), shape=(n, n))
    knn_hit = sp.csr_matrix((np.ones(n * kk, dtype=np.int8),
                             (np.repeat(np.arange(n, dtype=np.int64), kk), rank.reshape(-1))), shape=(n, n))
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(e.indptr))
    cols = e.indices.astype(np.int64)
    out = np.asarray(knn_sim[rows, cols]).reshape(-1)
    miss = np.flatnonzero(np.asarray(knn_hit[rows, cols]).reshape(-1) == 0)
    step = max(1, DOT_CHUNK_ELEMS // x.shape[1])
    for s in range(0, len(miss), step):
        m = miss[s : s + step]
        out[m] = np.einsum("ij,ij->i", x[rows[m]], x[cols[m]], dtype=np.float64)
    return out


# ------------------------------------------------------------------------------------------ steps
#: rows of M1 per chunk of the expansion step (bounds the temporaries of its sparse products)
EXPANSION_CHUNK_ROWS = 8192


def expansion_sets(rank: np.ndarray, k1: int) -> sp.csr_matrix:
    """``E(i)`` (step 3) for all ``i``: the pattern of an ``N x N`` CSR matrix (sorted indices).

    With ``M1[i, j] = [j in R(i, k1)]`` and ``Mh[c, j] = [j in R(c, round(k1/2))]``:
    ``|R(c, k1/2) ∩ R(i, k1)| = (M1 @ Mh.T)[i, c]``, sampled on the pattern of M1; the rows ``c`` passing
    the 2/3 test form P, and ``E = pattern(M1 + P @ Mh)`` — sparse products in scipy's C++ kernels, done
    for ``EXPANSION_CHUNK_ROWS`` rows of M1 at a time (so their temporaries stay O(chunk * k^2)).
    """
    n = rank.shape[0]
    half = int(np.around(k1 / 2.0))  # numpy rounds half to even, as the reference's np.around
    m1 = _pattern(*reciprocal_pairs(rank, k1), n)
    mh = _pattern(*reciprocal_pairs(rank, half), n)
    mht = mh.T.tocsr()
    rh_count = np.diff(mh.indptr).astype(np.float64)
    index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    parts, counts = [], []
    for a in range(0, n, EXPANSION_CHUNK_ROWS):
        b = min(n, a + EXPANSION_CHUNK_ROWS)
        m1c = m1[a:b]
        r1_rows = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(m1c.indptr))
        r1_cols = m1c.indices.astype(np.int64)
        inter = np.asarray((m1c @ mht).tocsr()[r1_rows, r1_cols]).reshape(-1)
        passing = inter > 2.0 / 3.0 * rh_count[r1_cols]  # same float expression as the reference
        p = _pattern(r1_rows[passing], r1_cols[passing], n)[: b - a]
        e = (m1c + p @ mh).tocsr()
        e.sum_duplicates()
        e.sort_indices()
        parts.append(e.indices.astype(index_dtype))
        counts.append(np.diff(e.indptr))
        del m1c, p, e, inter, r1_rows, r1_cols
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    indices = np.concatenate(parts)
    out = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def build_v(x: np.ndarray, rank: np.ndarray, sims: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """The (query-expanded) matrix V of steps 3-5 as an ``N x N`` float64 CSR matrix with sorted indices."""
    n = x.shape[0]
    e_pat = expansion_sets(rank, k1)
    cols = e_pat.indices
    s = _pair_similarities(x, e_pat, sims, rank)
    logits = -(2.0 - 2.0 * s)
    counts = np.diff(e_pat.indptr)
    starts = _segment_starts(counts)  # every row is non-empty: i is in its own E(i)
    rmax = np.maximum.reduceat(logits, starts)
    e = np.exp(logits - np.repeat(rmax, counts))
    e /= np.repeat(np.add.reduceat(e, starts), counts)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    v = sp.csr_matrix((e, cols, indptr), shape=(n, n))
    if k2 != 1:
        w = min(k2, rank.shape[1])
        a_rows = np.repeat(np.arange(n, dtype=np.int64), w)
        a = sp.csr_matrix((np.full(n * w, 1.0 / w), (a_rows, rank[:, :w].reshape(-1))), shape=(n, n))
        v = (a @ v).tocsr()
    v.sort_indices()
    return v


# ------------------------------------------------------------------------------------------ public
def jaccard_distance(
    features: np.ndarray,
    k1: int = 30,
    k2: int = 6,
    *,
    knn_backend: str = "auto",
    knn_result: Optional[tuple[np.ndarray, np.ndarray]] = None,
    progress: bool = False,
    timings: Optional[dict] = None,
    max_distance: Optional[float] = None,
) -> sp.csr_matrix:
    """k-reciprocal Jaccard distance of the rows of ``features``, as a sparse matrix.

    Args:
        features: ``[N, d]`` float array; rows are L2-normalised here if they are not already.
        k1: size of the initial neighbour lists (``i`` itself included); clipped to N.
        k2: query-expansion width (``1`` = none); clipped to N.
        knn_backend: passed to :func:`lf2core.cluster.knn.knn`.
        knn_result: a precomputed ``(similarities [N, K], indices [N, K])`` with ``K >= min(k1, N)`` and
            ``i`` first in row ``i`` (skips the search).
        progress: tqdm bars for the kNN and the min-sum.
        timings: if a dict is given, ``knn_s`` / ``v_s`` / ``minsum_s`` wall times, ``v_nnz`` / ``nnz``
            (stored entries of V / of the result) and ``knn_backend`` (the one used) are stored in it.
        max_distance: store only the entries ``<= max_distance`` (and the diagonal). ``None`` (default):
            every pair sharing a column of V, the documented contract. ``pseudo_labels`` passes ``eps``:
            DBSCAN only looks at entries ``<= eps``, and the matrix shrinks from ~2,000 stored entries per
            row (k1=30) to the few true neighbours.

    Returns:
        ``scipy.sparse.csr_matrix`` ``[N, N]`` float32, symmetric, sorted indices. Stored entries are the
        distances of the pairs sharing a column of V (the diagonal, 0, included); an absent entry means
        distance 1.
    """
    for name, val in (("k1", k1), ("k2", k2)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"jaccard_distance: {name} must be a positive integer, got {val!r}")
    x = normalize_rows(features)
    n = x.shape[0]
    kk = min(int(k1), n)
    t0 = time.perf_counter()
    if knn_result is None:
        if knn_backend == "auto":
            knn_backend = _auto_backend()
        sims, rank = knn(x, kk, backend=knn_backend, progress=progress,  # type: ignore[arg-type]
                         index_dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)
    else:
        sims, rank = knn_result
        if rank.shape[0] != n or rank.shape[1] < kk or sims.shape != rank.shape:
            raise ValueError(f"jaccard_distance: knn_result has shape {rank.shape}, need [{n}, >= {kk}]")
        if np.any(rank[:, 0] != np.arange(n)):
            raise ValueError("jaccard_distance: knn_result rows must start with the row itself")
        sims, rank = np.asarray(sims)[:, :kk], np.asarray(rank, dtype=np.int64)[:, :kk]
    t1 = time.perf_counter()
    v = build_v(x, rank, sims, int(k1), int(k2))
    t2 = time.perf_counter()
    dist = jaccard_from_v(v, progress=progress, max_distance=max_distance)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(knn_s=t1 - t0, v_s=t2 - t1, minsum_s=t3 - t2, v_nnz=int(v.nnz), nnz=int(dist.nnz),
                       knn_backend=knn_backend if knn_result is None else "given")
    log.debug("jaccard: N=%d knn %.2fs V %.2fs (nnz %d) min-sum %.2fs (nnz %d)", n, t1 - t0, t2 - t1,
              v.nnz, t3 - t2, dist.nnz)
    return dist
