"""Sparse, vectorised k-reciprocal Jaccard distance (the SpCL / re-ranking "jaccard_dist").

Semantics (docs: /work/shared/docs/lf2-method.md, "k-reciprocal Jaccard distance"), X = L2-normalised
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
- expansion (3) enumerates the triplets ``(i, c, j in Rc)``, tests ``(i, j) in R(i, k1)`` the same way
  and counts per ``(i, c)`` with ``bincount``; E is the unique set of surviving keys;
- V (4) is a CSR matrix; the softmax is a segmented max/sum (``reduceat``) over its rows; similarities
  come from the kNN result when the pair is there, else from a chunked row-wise dot product;
- the query expansion (5) is one sparse product ``A @ V`` with ``A[i, initial_rank[i, :k2]] = 1/k2``;
- the min-sum (6) uses V's columns as inverted lists: for every stored ``V[i, c]`` and every row
  ``j >= i`` of column ``c`` it emits ``min(V[i, c], V[j, c])``, summed per pair by a COO->CSR conversion,
  block by block of rows (bounded memory), and mirrored to the lower triangle (exactly symmetric).

The result stores exactly the pairs that share a column of V (the diagonal included, value 0); every
absent pair has distance 1, as in the dense reference.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from .knn import _as_features, knn

log = logging.getLogger(__name__)

#: target number of (pair, column) terms materialised per block of the min-sum (bounds peak memory)
MINSUM_BLOCK_TERMS = 4_000_000
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


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """Start offset of each segment for segment lengths ``counts`` (int64)."""
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges ``[starts[e], starts[e] + counts[e])``: (owner e of each element, element positions)."""
    counts = counts.astype(np.int64, copy=False)
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offs = np.arange(total, dtype=np.int64) - np.repeat(_segment_starts(counts), counts)
    return owner, starts.astype(np.int64, copy=False)[owner] + offs


def reciprocal_pairs(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``R(i, k)`` for all ``i`` as pairs ``(rows, cols)``, rows ascending, each row in rank order.

    Args:
        rank: ``[N, K]`` int64 neighbour indices, row ``i`` starting with ``i``.
        k: the slice ``rank[:, :k+1]`` (cut at the K columns there are) defines the forward lists.
    """
    n, kk = rank.shape
    w = min(k + 1, kk)
    cols = rank[:, :w].reshape(-1)
    rows = np.repeat(np.arange(n, dtype=np.int64), w)
    skeys = np.sort(rows * n + cols)
    rev = cols * n + rows
    pos = np.minimum(np.searchsorted(skeys, rev), len(skeys) - 1)
    keep = skeys[pos] == rev
    return rows[keep], cols[keep]


def _pair_similarities(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray,
                       rank: np.ndarray) -> np.ndarray:
    """``x[rows] . x[cols]`` (float64), taken from the kNN result when ``(i, j)`` or ``(j, i)`` is in it."""
    n, kk = rank.shape
    knn_keys = (np.arange(n, dtype=np.int64)[:, None] * n + rank).reshape(-1)
    order = np.argsort(knn_keys, kind="stable")
    skeys, svals = knn_keys[order], sims.reshape(-1)[order].astype(np.float64)
    out = np.full(len(rows), np.nan)
    for a, b in ((rows, cols), (cols, rows)):
        todo = np.isnan(out)
        if not todo.any():
            break
        q = a[todo] * n + b[todo]
        pos = np.minimum(np.searchsorted(skeys, q), len(skeys) - 1)
        hit = skeys[pos] == q
        sub = out[todo]
        sub[hit] = svals[pos[hit]]
        out[todo] = sub
    miss = np.flatnonzero(np.isnan(out))
    step = max(1, DOT_CHUNK_ELEMS // x.shape[1])
    for s in range(0, len(miss), step):
        m = miss[s : s + step]
        out[m] = np.einsum("ij,ij->i", x[rows[m]], x[cols[m]], dtype=np.float64)
    return out


# ------------------------------------------------------------------------------------------ steps
def expansion_sets(rank: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """``E(i)`` (step 3) for all ``i`` as unique pairs ``(rows, cols)`` sorted by ``(row, col)``."""
    n = rank.shape[0]
    half = int(np.around(k1 / 2.0))  # numpy rounds half to even, as the reference's np.around
    r1_rows, r1_cols = reciprocal_pairs(rank, k1)
    rh_rows, rh_cols = reciprocal_pairs(rank, half)
    r1_keys = np.sort(r1_rows * n + r1_cols)
    rh_count = np.bincount(rh_rows, minlength=n).astype(np.int64)
    rh_start = _segment_starts(rh_count)

    # triplets (e = (i, c) in R1, j in Rc), in blocks of R1 entries to bound memory
    keys_out = [r1_keys]
    n_e = len(r1_rows)
    cost = rh_count[r1_cols]
    bounds = np.searchsorted(np.cumsum(cost), np.arange(MINSUM_BLOCK_TERMS, int(cost.sum()) + 1,
                                                          MINSUM_BLOCK_TERMS), side="right")
    edges = np.unique(np.concatenate([[0], bounds, [n_e]]))
    for a, b in zip(edges[:-1], edges[1:]):
        ci = r1_cols[a:b]
        owner, pos = _expand_ranges(rh_start[ci], rh_count[ci])
        i = r1_rows[a:b][owner]
        j = rh_cols[pos]
        q = i * n + j
        p = np.minimum(np.searchsorted(r1_keys, q), len(r1_keys) - 1)
        inter = np.bincount(owner, weights=(r1_keys[p] == q), minlength=b - a)
        passing = inter > 2.0 / 3.0 * rh_count[ci]  # same float expression as the reference
        keys_out.append(q[passing[owner]])
    keys = np.unique(np.concatenate(keys_out))
    return keys // n, keys % n


def build_v(x: np.ndarray, rank: np.ndarray, sims: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """The (query-expanded) matrix V of steps 3-5 as an ``N x N`` float64 CSR matrix with sorted indices."""
    n = x.shape[0]
    rows, cols = expansion_sets(rank, k1)
    s = _pair_similarities(x, rows, cols, sims, rank)
    logits = -(2.0 - 2.0 * s)
    counts = np.bincount(rows, minlength=n)
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


def jaccard_from_v(v: sp.csr_matrix, progress: bool = False) -> sp.csr_matrix:
    """Step 6 on a CSR matrix V with sorted indices: an ``N x N`` float32 CSR of ``1 - m/(2-m)``.

    Stored entries are exactly the pairs sharing a column of V (explicit zeros kept)."""
    n = v.shape[0]
    nnz = v.nnz
    v_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(v.indptr))
    v_cols = v.indices.astype(np.int64)
    # CSC view whose rows are sorted within each column (stable sort of the row-major order)
    perm = np.argsort(v_cols, kind="stable")
    col_rows = v_rows[perm]
    col_vals = v.data[perm]
    col_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(v_cols, minlength=n), out=col_ptr[1:])
    csc_pos = np.empty(nnz, dtype=np.int64)
    csc_pos[perm] = np.arange(nnz, dtype=np.int64)
    # entry (i, c) pairs with the rows j >= i of column c: the suffix of the column from i's own slot
    cnt = col_ptr[v_cols + 1] - csc_pos
    cum = np.cumsum(np.bincount(v_rows, weights=cnt, minlength=n)).astype(np.int64)
    bounds = np.searchsorted(cum, np.arange(MINSUM_BLOCK_TERMS, int(cum[-1]) + 1, MINSUM_BLOCK_TERMS),
                             side="right")
    edges = np.unique(np.concatenate([[0], bounds, [n]]))
    ptr_parts, idx_parts, dat_parts = [np.zeros(1, dtype=np.int64)], [], []
    offset = 0
    for a, b in tqdm(list(zip(edges[:-1], edges[1:])), desc="jaccard min-sum", disable=not progress,
                     unit="block"):
        ea, eb = v.indptr[a], v.indptr[b]
        owner, pos = _expand_ranges(csc_pos[ea:eb], cnt[ea:eb])
        mins = np.minimum(v.data[ea:eb][owner], col_vals[pos])
        blk = sp.csr_matrix((mins, (v_rows[ea:eb][owner] - a, col_rows[pos])), shape=(b - a, n))
        blk.sum_duplicates()
        m = blk.data
        d = 1.0 - m / (2.0 - m)
        np.maximum(d, 0.0, out=d)
        ptr_parts.append(blk.indptr[1:].astype(np.int64) + offset)
        idx_parts.append(blk.indices.astype(np.int64))
        dat_parts.append(d.astype(np.float32))
        offset += blk.nnz
    up_ptr = np.concatenate(ptr_parts)
    up_idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    up_dat = np.concatenate(dat_parts) if dat_parts else np.zeros(0, np.float32)
    del ptr_parts, idx_parts, dat_parts
    return _mirror_upper(up_ptr, up_idx, up_dat, n)


def _mirror_upper(up_ptr: np.ndarray, up_idx: np.ndarray, up_dat: np.ndarray, n: int) -> sp.csr_matrix:
    """Full symmetric CSR from an upper-triangular CSR (diagonal included, columns sorted per row)."""
    up_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(up_ptr))
    strict = up_idx != up_rows
    # lower part = transpose of the strict upper part; a stable sort by column keeps rows ascending
    lo_src = np.flatnonzero(strict)
    order = lo_src[np.argsort(up_idx[lo_src], kind="stable")]
    lo_rows = up_idx[order]
    lo_cols = up_rows[order]
    lo_dat = up_dat[order]
    lo_count = np.bincount(lo_rows, minlength=n).astype(np.int64)
    lo_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lo_count, out=lo_ptr[1:])
    # row i = its lower entries (cols < i) then its upper entries (cols >= i): sorted by column
    ptr = lo_ptr + up_ptr
    total = int(ptr[-1])
    index_dtype = np.int32 if max(total, n) < np.iinfo(np.int32).max else np.int64
    indices = np.empty(total, dtype=index_dtype)
    data = np.empty(total, dtype=np.float32)
    lo_dest = np.arange(len(lo_rows), dtype=np.int64) + up_ptr[lo_rows]
    up_dest = np.arange(len(up_rows), dtype=np.int64) + lo_ptr[up_rows + 1]
    indices[lo_dest] = lo_cols
    data[lo_dest] = lo_dat
    indices[up_dest] = up_idx
    data[up_dest] = up_dat
    out = sp.csr_matrix((data, indices, ptr.astype(index_dtype)), shape=(n, n))
    out.has_sorted_indices = True
    return out


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
        timings: if a dict is given, ``knn_s`` / ``v_s`` / ``minsum_s`` wall times are stored in it.

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
        sims, rank = knn(x, kk, backend=knn_backend, progress=progress)  # type: ignore[arg-type]
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
    dist = jaccard_from_v(v, progress=progress)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(knn_s=t1 - t0, v_s=t2 - t1, minsum_s=t3 - t2, v_nnz=int(v.nnz), nnz=int(dist.nnz))
    log.debug("jaccard: N=%d knn %.2fs V %.2fs (nnz %d) min-sum %.2fs (nnz %d)", n, t1 - t0, t2 - t1,
              v.nnz, t3 - t2, dist.nnz)
    return dist
