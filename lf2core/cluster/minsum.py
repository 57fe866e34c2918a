"""Step 6 of the k-reciprocal Jaccard distance: the min-sum ``m(i, j) = sum_c min(V[i, c], V[j, c])`` of
a sparse row-stochastic V, and ``1 - m / (2 - m)`` for every pair sharing a column (see
``lf2core.cluster.jaccard`` for steps 1-5 and the public ``jaccard_distance``)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

#: target number of (pair, column) terms materialised per block of the min-sum (bounds peak memory)
MINSUM_BLOCK_TERMS = 500_000
#: cells of the dense per-block accumulator of the min-sum (float64)
MINSUM_BUFFER = 1 << 21


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """Start offset of each segment for segment lengths ``counts`` (int64)."""
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


class _ChunkedOutput:
    """Growable (indices, data) storage in large chunks (> glibc's mmap threshold, so a freed chunk goes
    back to the OS), copied into the final arrays chunk by chunk: peak ~ output + one chunk."""

    CHUNK = 12 << 20  # entries

    def __init__(self, index_dtype) -> None:
        self.index_dtype = index_dtype
        self.chunks: list[tuple[np.ndarray, np.ndarray, int]] = []

    def append(self, idx: np.ndarray, dat: np.ndarray) -> None:
        pos = 0
        while pos < len(idx):
            if not self.chunks or self.chunks[-1][2] == len(self.chunks[-1][0]):
                cap = max(self.CHUNK, 1)
                self.chunks.append((np.empty(cap, self.index_dtype), np.empty(cap, np.float32), 0))
            ci, cd, fill = self.chunks[-1]
            take = min(len(idx) - pos, len(ci) - fill)
            ci[fill : fill + take] = idx[pos : pos + take]
            cd[fill : fill + take] = dat[pos : pos + take]
            self.chunks[-1] = (ci, cd, fill + take)
            pos += take

    def finish(self, total: int, index_dtype) -> tuple[np.ndarray, np.ndarray]:
        indices = np.empty(total, dtype=index_dtype)
        data = np.empty(total, dtype=np.float32)
        pos = 0
        self.chunks.reverse()
        while self.chunks:
            ci, cd, fill = self.chunks.pop()
            indices[pos : pos + fill] = ci[:fill]
            data[pos : pos + fill] = cd[:fill]
            pos += fill
            del ci, cd
        return indices, data


def jaccard_from_v(v: sp.csr_matrix, progress: bool = False, max_distance: Optional[float] = None) -> sp.csr_matrix:
    """Step 6 on a CSR matrix V: an ``N x N`` float32 CSR of ``1 - m/(2-m)``, clipped at 0.

    Stored entries are exactly the pairs sharing a column of V (explicit zeros kept), indices sorted.
    Only the upper triangle (``j >= i``) is computed, in contiguous row blocks: every stored ``V[i, c]``
    is paired with the rows ``j >= i`` of column ``c`` (V's columns as inverted lists, rows ascending),
    giving terms ``min(V[i, c], V[j, c])`` with cell key ``(i - a) * N + j``; the distinct cells (the
    output pattern, already in row-major sorted order) come from a byte mask, and the sums from one
    ``bincount`` into that compact pattern. No sort, no per-row Python loop. The lower triangle is the
    mirror (:func:`_symmetric`), so the result is exactly symmetric and each pair's sum adds its shared
    columns in ascending order. Memory: V, the output, and O(``MINSUM_BLOCK_TERMS`` + ``MINSUM_BUFFER``)
    temporaries (the output is kept in large chunks copied into the final arrays).

    ``max_distance``: if given, only entries with distance ``<= max_distance`` are stored (the diagonal
    always is); for DBSCAN with ``eps = max_distance`` this gives exactly the same clustering from a much
    smaller matrix.
    """
    n = v.shape[0]
    v = sp.csr_matrix(v)
    v.sort_indices()
    row_nnz = np.diff(v.indptr).astype(np.int64)
    cols = _inverted_columns(v)
    # terms of each stored V[i, c]: the rows j >= i of column c (from i's own place in that column)
    entry_terms = (cols[0][v.indices + 1] - cols[4]).astype(cols[4].dtype)
    max_rows = max(1, MINSUM_BUFFER // n)
    edges = _block_edges(v, row_nnz, entry_terms, max_rows)
    mark = np.zeros(max_rows * n, dtype=bool)
    slot = np.empty(max_rows * n, dtype=np.int32 if max_rows * n < np.iinfo(np.int32).max else np.int64)
    index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    counts_parts = []
    store = _ChunkedOutput(index_dtype)
    for a, b in tqdm(list(zip(edges[:-1], edges[1:])), desc="jaccard min-sum", disable=not progress,
                     unit="block"):
        cells, d, counts = _block_distances(v, a, b, row_nnz, cols, entry_terms, mark, slot, max_distance)
        counts_parts.append(counts)
        store.append(cells.astype(index_dtype), d.astype(np.float32))
        del cells, d
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts_parts), out=indptr[1:])
    indices, data = store.finish(int(indptr[-1]), index_dtype)
    return _symmetric(indptr, indices, data, n)


def _symmetric(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n: int) -> sp.csr_matrix:
    """The symmetric ``N x N`` CSR whose upper triangle (diagonal included; rows' indices sorted, all
    ``>= row``) is ``(indptr, indices, data)``: row ``i`` = the mirrored entries ``(j, i)``, ``j < i``,
    then its own, so indices stay sorted without a sort. Explicit zeros are kept."""
    up_cnt = np.diff(indptr)
    rows = np.repeat(np.arange(n, dtype=np.int64), up_cnt)
    off = indices != rows
    # entry (i, j) mirrored to (j, i): scipy's COO -> CSR is a counting sort by row that keeps the input
    # order (i ascending) within a row
    lower = sp.coo_matrix((data[off], (indices[off], rows[off])), shape=(n, n)).tocsr()
    del rows, off
    lo_cnt = np.diff(lower.indptr).astype(np.int64)
    full_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lo_cnt + up_cnt, out=full_ptr[1:])
    total = int(full_ptr[-1])
    index_dtype = np.int32 if max(total, n) < np.iinfo(np.int32).max else np.int64
    out_idx = np.empty(total, dtype=index_dtype)
    out_dat = np.empty(total, dtype=np.float32)
    lo_pos = np.arange(lower.nnz, dtype=np.int64) - np.repeat(lower.indptr[:-1].astype(np.int64), lo_cnt) \
        + np.repeat(full_ptr[:-1], lo_cnt)
    out_idx[lo_pos] = lower.indices
    out_dat[lo_pos] = lower.data
    del lo_pos, lower
    up_pos = np.arange(len(indices), dtype=np.int64) - np.repeat(indptr[:-1], up_cnt) \
        + np.repeat(full_ptr[:-1] + lo_cnt, up_cnt)
    out_idx[up_pos] = indices
    out_dat[up_pos] = data
    out = sp.csr_matrix((out_dat, out_idx, full_ptr.astype(index_dtype)), shape=(n, n))
    out.has_sorted_indices = True
    return out


def _inverted_columns(v: sp.csr_matrix) -> tuple[np.ndarray, ...]:
    """V's columns as inverted lists: ``(col_ptr [N+1] int64, col_rows [nnz] (V's index dtype), col_vals
    [nnz], col_cnt [N] int64, place [nnz] int32 (int64 past 2^31 entries))``, rows ascending within each
    column; ``place[e]`` is the position in those lists of V's CSR entry ``e``."""
    small = np.int32 if v.nnz < np.iinfo(np.int32).max else np.int64
    marked = sp.csr_matrix((np.arange(v.nnz, dtype=small), v.indices, v.indptr), shape=v.shape)
    vt = marked.tocsc()  # rows come out ascending within each column (a counting sort over rows)
    vt.sort_indices()
    del marked
    col_ptr = vt.indptr.astype(np.int64)
    entry = vt.data
    place = np.empty(v.nnz, dtype=small)
    place[entry] = np.arange(v.nnz, dtype=small)
    return col_ptr, vt.indices, v.data[entry], np.diff(col_ptr), place


def _block_edges(v: sp.csr_matrix, row_nnz: np.ndarray, entry_terms: np.ndarray, max_rows: int) -> list[int]:
    """Row blocks ``[edges[i], edges[i+1])`` of at most ``MINSUM_BLOCK_TERMS`` terms (or one row) and
    ``max_rows`` rows (``MINSUM_BUFFER`` cells); ``entry_terms`` = terms of each stored entry of V."""
    n = v.shape[0]
    row_terms = np.zeros(n + 1, dtype=np.int64)
    per_row = np.add.reduceat(np.append(entry_terms, 0), v.indptr[:-1])
    per_row[row_nnz == 0] = 0  # reduceat gives an empty segment the value at its start
    np.cumsum(per_row, out=row_terms[1:])
    edges = [0]
    while edges[-1] < n:
        a = edges[-1]
        b = int(np.searchsorted(row_terms, row_terms[a] + MINSUM_BLOCK_TERMS, side="right")) - 1
        edges.append(min(max(b, a + 1), a + max_rows, n))
    return edges


def _block_distances(v: sp.csr_matrix, a: int, b: int, row_nnz: np.ndarray, cols: tuple, entry_terms: np.ndarray,
                     mark: np.ndarray, slot: np.ndarray,
                     max_distance: Optional[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``a..b-1`` of the upper triangle: ``(column indices, distances float64, entries per row)``,
    row-major sorted. ``mark``/``slot`` are reusable buffers of at least ``(b - a) * N`` cells."""
    n = v.shape[0]
    _, col_rows, col_vals, _, place = cols
    e0, e1 = int(v.indptr[a]), int(v.indptr[b])
    t_cnt = entry_terms[e0:e1]
    n_terms = int(t_cnt.sum())
    # int32 where it fits (the block's cells are < MINSUM_BUFFER): half the memory traffic of int64
    small = np.int32 if max(len(col_rows), (b - a) * n) < np.iinfo(np.int32).max else np.int64
    t_pos = np.repeat((place[e0:e1] - _segment_starts(t_cnt)).astype(small), t_cnt)
    t_pos += np.arange(n_terms, dtype=small)
    mins = np.minimum(np.repeat(v.data[e0:e1], t_cnt), col_vals[t_pos])
    key = np.repeat(np.repeat(np.arange(b - a, dtype=small) * n, row_nnz[a:b]), t_cnt)
    key += col_rows[t_pos]
    del t_pos
    nc = (b - a) * n
    mark[key] = True
    cells = np.flatnonzero(mark[:nc])
    mark[:nc] = False
    slot[cells] = np.arange(len(cells), dtype=slot.dtype)
    m = np.bincount(slot[key], weights=mins, minlength=len(cells))
    del key, mins
    d = 1.0 - m / (2.0 - m)
    np.maximum(d, 0.0, out=d)
    if max_distance is not None:
        keep = d <= max_distance
        keep |= cells % (n + 1) == a  # the diagonal cell (i - a) * n + i
        cells, d = cells[keep], d[keep]
    row_end = np.searchsorted(cells, np.arange(1, b - a + 1, dtype=np.int64) * n)
    counts = np.diff(row_end, prepend=0)
    cells -= np.repeat(np.arange(b - a, dtype=np.int64) * n, counts)
    return cells, d, counts
