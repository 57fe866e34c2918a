"""Person re-ID retrieval metrics (mAP, CMC, mINP), distances and k-reciprocal re-ranking.

Protocol (torchreid / Market-1501, the one every UDA re-ID paper reports):

- For each query, gallery entries with the **same identity AND the same camera** as the query are
  dropped (they are too easy); gallery entries of other identities (including distractors, pid 0) stay.
- A query with no remaining true match is skipped; if no query has one, ``ValueError`` is raised.
- Ranking: gallery sorted by ascending distance with a **stable sort, so ties are broken by gallery
  index** (the lower index ranks first). This is deterministic; sklearn's ``average_precision_score``
  treats tied scores as one threshold instead, so the two agree exactly only when there are no ties
  between a true match and a non-match.
- CMC (market1501 style): ``cmc[k]`` = fraction of valid queries with a true match among their top k+1.
  ``cmc`` always has ``max_rank`` entries; positions beyond the number of gallery entries a query keeps
  are 1 for that query (its matches are all ranked by then).
- AP of a query = mean over its true matches of the precision at the match's rank; mAP = mean AP.
- mINP (Ye et al. 2021, as in torchreid): INP = num_true_matches / (rank of the hardest match, 1-based).

All metrics are fractions in [0, 1].

Implementation: queries are processed in chunks of ~4M distances (~20 bytes of scratch per distance, so
~80 MB per chunk), chunks run on a small thread pool. Each chunk is ranked by one sort of packed
``(distance, gallery index)`` int64 keys (numpy's SIMD sort); after that only the (few) gallery entries
sharing the query's identity are touched. No Python loop over queries or gallery entries.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

import numpy as np
import torch

from .errors import Lf2Error

ArrayLike = Union[np.ndarray, torch.Tensor]

# Elements of the [chunk, G] working arrays per chunk (~20 bytes each at peak: float32 copy, int32 bits,
# int64 keys/order, bool match), i.e. ~80 MB of scratch per concurrent chunk whatever the problem size.
_CHUNK_ELEMENTS = 1 << 22
# Chunks evaluated concurrently (each holds its own scratch arrays).
_MAX_WORKERS = 4


class EvaluationError(Lf2Error, ValueError):
    """Inputs to the evaluation are inconsistent (shapes, NaN distances, no valid query)."""


def _as_tensor(x: ArrayLike, name: str, *, floating: bool) -> torch.Tensor:
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


def _check_inputs(
    distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _as_tensor(distmat, "distmat", floating=True)
    qp = _as_tensor(q_pids, "q_pids", floating=False).reshape(-1)
    gp = _as_tensor(g_pids, "g_pids", floating=False).reshape(-1)
    qc = _as_tensor(q_camids, "q_camids", floating=False).reshape(-1)
    gc = _as_tensor(g_camids, "g_camids", floating=False).reshape(-1)
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


def _packed_keys(d: torch.Tensor) -> np.ndarray:
    """Distinct int64 keys ordering the entries of each row of ``d`` [C, G] float32 by (distance, index).

    key = (order-preserving int32 image of the distance) << 32 | gallery index. IEEE-754: flipping the
    magnitude bits of negative numbers makes signed-int order equal float order; ``+ 0.0`` turns -0.0
    into +0.0 first (they are equal distances, so they tie and fall back to the index).

    Returns:
        [C, G] int64 numpy array.
    """
    bits = (d.numpy() + np.float32(0.0)).view(np.int32)
    key = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)
    del bits
    key <<= 32
    key |= np.arange(d.shape[1], dtype=np.int64)
    return key


def _stable_argsort(d: torch.Tensor) -> torch.Tensor:
    """Row-wise argsort of ``d`` [C, G] by (distance, gallery index): the tie rule of this module.

    float32 rows are sorted as packed keys (``_packed_keys``) with numpy's SIMD sort (the keys are
    distinct, so any sort is "stable"), 2-3x faster than a stable ``torch.sort`` on CPU; other dtypes
    use ``torch.sort(stable=True)``.

    Returns:
        [C, G] int64 gallery indices in rank order.
    """
    if d.dtype != torch.float32 or d.shape[1] >= 2**31:
        return torch.sort(d, dim=1, stable=True).indices
    key = _packed_keys(d)
    key.sort(axis=1)
    key &= 0xFFFFFFFF
    return torch.from_numpy(key)


def _segment_cumsum(flags: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Inclusive cumulative sum of ``flags`` restarting at each row (``rows`` sorted ascending).

    Args:
        flags: [M] int64 values; rows: [M] int64 row of each value (non-decreasing); num_rows: row count.

    Returns:
        [M] int64: for entry m, the sum of ``flags`` over entries of the same row up to and including m.
    """
    total = torch.cumsum(flags, 0)
    per_row = torch.bincount(rows, weights=flags.to(torch.float64), minlength=num_rows).to(torch.int64)
    before_row = torch.cumsum(per_row, 0) - per_row  # sum of flags in all earlier rows
    return total - before_row[rows]


ChunkStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _stats_from_match_positions(
    rows: torch.Tensor, pos: torch.Tensor, excluded: torch.Tensor, c: int, g: int
) -> ChunkStats:
    """Per-query statistics from the ranked positions of each query's same-identity gallery entries.

    Args:
        rows: [M] int64 query row of each same-identity entry, non-decreasing, and within a row the
            entries in rank order; pos: [M] int64 0-based position in the full ranking (dropped entries
            included); excluded: [M] int64 1 where the entry has the query's camera (dropped), else 0.
        c, g: number of queries in the chunk and of gallery entries.

    Returns:
        num_rel [C] int64 (true matches kept), ap [C] float64 (0 where num_rel = 0),
        first [C] int64 (0-based rank of the easiest match among kept entries; G where none),
        last [C] int64 (0-based rank of the hardest match; -1 where none).
    """
    # 1-based rank among kept entries = position + 1 - number of dropped entries ranked up to it
    rank = pos + 1 - _segment_cumsum(excluded, rows, c)
    good = excluded == 0
    rows, rank = rows[good], rank[good]
    j = _segment_cumsum(torch.ones_like(rows), rows, c)  # 1-based index of the match within its query
    num_rel = torch.bincount(rows, minlength=c)
    ap = torch.zeros(c, dtype=torch.float64).index_add_(0, rows, j.to(torch.float64) / rank.to(torch.float64))
    ap = ap / num_rel.clamp_min(1)
    first = torch.full((c,), g + 1, dtype=torch.int64).scatter_reduce_(0, rows, rank, "amin") - 1
    last = torch.zeros(c, dtype=torch.int64).scatter_reduce_(0, rows, rank, "amax") - 1
    return num_rel, ap, first, last


def _rank_chunk_sort(
    d: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor
) -> ChunkStats:
    """``_rank_chunk`` by a full row sort (any float dtype)."""
    c, g = d.shape
    order = _stable_argsort(d)  # [C, G]; ties -> lower gallery index first
    match = gp[order] == qp[:, None]  # [C, G] same identity, in rank order
    rows, cols = match.nonzero(as_tuple=True)  # [M] each, row-major so cols ascend within a row
    del match
    gidx = order[rows, cols]
    del order
    excluded = (gc[gidx] == qc[rows]).to(torch.int64)  # same pid AND same camera: dropped
    return _stats_from_match_positions(rows, cols, excluded, c, g)


def _rank_chunk_keys(
    d: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor
) -> ChunkStats:
    """``_rank_chunk`` without sorting the rows (float32 only).

    Only the positions of the (few) same-identity entries are needed. With distinct packed keys, the
    position of the j-th smallest same-identity key of a row is the number of row keys smaller than it:
    bucket every key by how many same-identity keys are smaller (one batched ``searchsorted`` into the
    row's sorted same-identity keys), histogram the buckets, and take cumulative counts.
    """
    c, g = d.shape
    key = _packed_keys(d)  # [C, G] int64, distinct within a row
    match = gp[None, :] == qp[:, None]  # [C, G] (unsorted gallery order)
    rows, cols = match.nonzero(as_tuple=True)  # row-major
    del match
    mkey = torch.from_numpy(key)[rows, cols]  # [M]
    # order the same-identity entries by (row, key): keys are below 2**63 - 1, rows < 2**31
    counts = torch.bincount(rows, minlength=c)
    p = int(counts.max()) if rows.numel() else 0
    if p == 0:
        z = torch.zeros(c, dtype=torch.int64)
        return z, torch.zeros(c, dtype=torch.float64), torch.full((c,), g, dtype=torch.int64), z - 1
    # ascending keys within each row (rows are already grouped; a stable sort by key then by row)
    o = torch.sort(mkey, stable=True).indices
    o = o[torch.sort(rows[o], stable=True).indices]
    rows, cols, mkey = rows[o], cols[o], mkey[o]
    slot = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]  # index within its row
    table = torch.full((c, p), torch.iinfo(torch.int64).max, dtype=torch.int64)  # > every real key
    table[rows, slot] = mkey
    bucket = torch.searchsorted(table, torch.from_numpy(key))  # [C, G]: # same-identity keys < key
    del key
    bucket += (torch.arange(c, dtype=torch.int64) * (p + 1))[:, None]
    hist = torch.bincount(bucket.view(-1), minlength=c * (p + 1)).view(c, p + 1)
    del bucket
    # entries with bucket <= j are the keys <= the j-th same-identity key, itself included
    pos = torch.cumsum(hist, 1)[rows, slot] - 1
    excluded = (gc[cols] == qc[rows]).to(torch.int64)  # same pid AND same camera: dropped
    return _stats_from_match_positions(rows, pos, excluded, c, g)


# Tests set this to compare both implementations on float32 input.
_FORCE_SORT = False


def _rank_chunk(
    d: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor
) -> ChunkStats:
    """Per-query ranking statistics for one chunk of queries.

    Args:
        d: [C, G] distances; qp, qc: [C] query pids / camids; gp, gc: [G] gallery pids / camids.

    Returns:
        see ``_stats_from_match_positions``.
    """
    if d.dtype == torch.float32 and d.shape[1] < 2**31 and not _FORCE_SORT:
        return _rank_chunk_keys(d, qp, qc, gp, gc)
    return _rank_chunk_sort(d, qp, qc, gp, gc)


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    *,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """mAP, mINP and CMC of a query x gallery distance matrix (protocol in the module docstring).

    Args:
        distmat: [Q, G] distances (numpy array or torch tensor; smaller = more similar; NaN rejected).
        q_pids, q_camids: [Q] query identity / camera ids.
        g_pids, g_camids: [G] gallery identity / camera ids (distractors, e.g. pid 0, are plain non-matches).
        max_rank: length of the returned CMC curve.
        chunk_size: queries per chunk (default: ~4M distmat elements per chunk).

    Returns:
        ``{"mAP": float, "mINP": float, "cmc": np.ndarray [max_rank] float64, "num_valid_queries": int}``,
        fractions in [0, 1], ``cmc[0]`` = Rank-1.

    Raises:
        EvaluationError (a ValueError): inconsistent shapes, NaN distances, or no query has a valid match.
    """
    if int(max_rank) < 1:
        raise EvaluationError(f"max_rank: must be >= 1, got {max_rank}")
    max_rank = int(max_rank)
    d, qp, gp, qc, gc = _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    nq, ng = d.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // ng)
    chunk_size = max(1, int(chunk_size))

    num_rel = torch.empty(nq, dtype=torch.int64)
    ap = torch.empty(nq, dtype=torch.float64)
    first = torch.empty(nq, dtype=torch.int64)
    last = torch.empty(nq, dtype=torch.int64)

    def work(s: int) -> None:
        e = min(nq, s + chunk_size)
        num_rel[s:e], ap[s:e], first[s:e], last[s:e] = _rank_chunk(d[s:e], qp[s:e], qc[s:e], gp, gc)

    starts = range(0, nq, chunk_size)
    workers = max(1, min(_MAX_WORKERS, torch.get_num_threads(), len(starts)))
    if workers == 1:
        for s in starts:
            work(s)
    else:  # numpy's sort and torch's kernels release the GIL
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, starts))

    valid = num_rel > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise EvaluationError(
            f"no query has a valid match in the gallery ({nq} queries, {ng} gallery entries): every true "
            "match is missing or shares the query's camera"
        )
    f = first[valid]
    # cmc[k] = fraction of valid queries whose first match is at 0-based rank <= k
    hist = torch.bincount(f.clamp_max(max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = (torch.cumsum(hist, 0).to(torch.float64) / n_valid).numpy()
    inp = num_rel[valid].to(torch.float64) / (last[valid] + 1).to(torch.float64)
    return {
        "mAP": float(ap[valid].mean()),
        "mINP": float(inp.mean()),
        "cmc": cmc,
        "num_valid_queries": n_valid,
    }


def valid_topk(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    topk: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery entries per query under the evaluation protocol (used by the rank-list plot).

    Same-pid-same-camera entries are excluded and ties are broken by gallery index, exactly as in
    ``evaluate_rank``.

    Returns:
        indices [Q, topk] int64 gallery indices (-1 pads queries with fewer than ``topk`` kept entries),
        hits [Q, topk] bool (True where the gallery entry has the query's pid).
    """
    d, qp, gp, qc, gc = _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    nq, ng = d.shape
    topk = int(topk)
    indices = np.full((nq, topk), -1, dtype=np.int64)
    hits = np.zeros((nq, topk), dtype=bool)
    chunk = max(1, _CHUNK_ELEMENTS // ng)
    for s in range(0, nq, chunk):
        e = min(nq, s + chunk)
        order = _stable_argsort(d[s:e])
        match = gp[order] == qp[s:e, None]
        keep = ~(match & (gc[order] == qc[s:e, None]))
        # stable sort of "dropped" flags moves kept entries first, preserving their rank order
        sel = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :topk]
        n_keep = keep.sum(1)
        cols = torch.arange(sel.shape[1])
        ok = cols[None, :] < n_keep[:, None]
        idx = torch.gather(order, 1, sel)
        hit = torch.gather(match, 1, sel)
        k = sel.shape[1]
        indices[s:e, :k] = torch.where(ok, idx, -1).numpy()
        hits[s:e, :k] = (hit & ok).numpy()
    return indices, hits


def _to_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = _as_tensor(x, name, floating=True)
    if t.dim() != 2:
        raise EvaluationError(f"{name}: expected a 2-D [N, D] feature array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise EvaluationError(f"{name}: contains NaN or infinite values")
    return t


def pairwise_distance(q: ArrayLike, g: ArrayLike, *, chunk_size: int = 1024) -> np.ndarray:
    """Squared Euclidean distances ``||q_i - g_j||^2`` (= 2 - 2 q.g for L2-normalised features).

    Args:
        q: [Q, D] query features; g: [G, D] gallery features (numpy or torch; computed in float32,
            or float64 if both inputs are float64).
        chunk_size: query rows per matrix product.

    Returns:
        [Q, G] numpy array, clipped below at 0.
    """
    qt = _to_float_tensor(q, "q")
    gt = _to_float_tensor(g, "g")
    if qt.shape[1] != gt.shape[1]:
        raise EvaluationError(f"feature dimensions differ: q has {qt.shape[1]}, g has {gt.shape[1]}")
    dtype = torch.float64 if (qt.dtype == torch.float64 and gt.dtype == torch.float64) else torch.float32
    qt, gt = qt.to(dtype), gt.to(dtype)
    g2 = (gt * gt).sum(1)  # [G]
    out = torch.empty(qt.shape[0], gt.shape[0], dtype=dtype)
    for s in range(0, qt.shape[0], chunk_size):
        qc = qt[s : s + chunk_size]
        blk = out[s : s + chunk_size]
        torch.mm(qc, gt.t(), out=blk)
        blk.mul_(-2).add_((qc * qc).sum(1, keepdim=True)).add_(g2[None, :]).clamp_(min=0)
    return out.numpy()


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rerank(
    q_feat: ArrayLike,
    g_feat: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a query x gallery problem.

    Features are L2-normalised, then ``X = [q_feat; g_feat]`` ([N = Q+G, D]) goes through
    ``lf2core.cluster.jaccard_distance(X, k1, k2)`` (sparse k-reciprocal Jaccard distance; absent
    entries mean distance 1). The final distance is

        final[i, j] = (1 - lambda) * jaccard[i, Q + j] + lambda * orig[i, j]

    with ``orig[i, j] = d(q_i, g_j) / max_{x in X} d(q_i, x)`` and ``d`` the squared Euclidean distance of
    the normalised features: the original distance scaled to [0, 1] by the query's largest distance to
    any query or gallery feature, as in the reference implementation (which normalises the rows of its
    full (Q+G) x (Q+G) distance matrix by their maxima; the common re-implementations square the
    distances once more, which we do not).

    Args:
        q_feat: [Q, D]; g_feat: [G, D] features (numpy or torch).
        k1, k2: neighbourhood sizes (k1 must be < Q + G).
        lambda_value: weight of the original distance, in [0, 1].

    Returns:
        [Q, G] float32 numpy distance matrix.
    """
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise EvaluationError(f"lambda_value: must be in [0, 1], got {lambda_value}")
    qt = _to_float_tensor(q_feat, "q_feat").float()
    gt = _to_float_tensor(g_feat, "g_feat").float()
    if qt.shape[1] != gt.shape[1]:
        raise EvaluationError(f"feature dimensions differ: q_feat has {qt.shape[1]}, g_feat has {gt.shape[1]}")
    nq, ng = qt.shape[0], gt.shape[0]
    if int(k1) >= nq + ng:
        raise EvaluationError(f"k1: must be smaller than the number of query + gallery features ({nq + ng}), got {k1}")
    try:
        from .cluster import jaccard_distance
    except ImportError as exc:  # pragma: no cover - depends on the cluster module being present
        raise NotImplementedError(
            "rerank needs lf2core.cluster.jaccard_distance, which is not available in this build"
        ) from exc
    x = _l2_normalise(torch.cat([qt, gt], 0))
    xq, xg = x[:nq], x[nq:]
    jac = jaccard_distance(x.numpy(), k1=int(k1), k2=int(k2))
    jac = jac.tocsr()[:nq].tocoo()
    final = np.ones((nq, ng), dtype=np.float32)
    gmask = jac.col >= nq
    final[jac.row[gmask], jac.col[gmask] - nq] = jac.data[gmask]
    final *= 1.0 - float(lambda_value)
    d_qg = torch.from_numpy(pairwise_distance(xq, xg))  # [Q, G] float32
    row_max = d_qg.amax(dim=1)
    chunk = 1024
    for s in range(0, nq, chunk):  # max over query rows too, in chunks
        row_max[s : s + chunk] = torch.maximum(
            row_max[s : s + chunk], torch.from_numpy(pairwise_distance(xq[s : s + chunk], xq)).amax(dim=1)
        )
    d_qg.div_(row_max.clamp_min(1e-12)[:, None]).mul_(float(lambda_value))  # in place: no extra [Q, G]
    final += d_qg.numpy()
    return final


_rerank = rerank  # evaluate_features' ``rerank`` flag shadows the function name


def evaluate_features(
    q_feat: ArrayLike,
    g_feat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    rerank: bool = False,
    *,
    max_rank: int = 50,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict[str, Any]:
    """Distances (squared Euclidean, or re-ranked) then ``evaluate_rank``.

    Args:
        q_feat: [Q, D], g_feat: [G, D] features (L2-normalised by the extractor); ids as in ``evaluate_rank``.
        rerank: use k-reciprocal re-ranking (``rerank(q_feat, g_feat, k1, k2, lambda_value)``).

    Returns:
        ``{"mAP", "R1", "R5", "R10", "mINP"}`` (floats in [0, 1]), ``"cmc"`` [max_rank] and
        ``"distmat"`` [Q, G] numpy (for the rank-list plot).
    """
    if rerank:
        distmat = _rerank(q_feat, g_feat, k1=k1, k2=k2, lambda_value=lambda_value)
    else:
        distmat = pairwise_distance(q_feat, g_feat)
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max(10, int(max_rank)))
    cmc = res["cmc"]
    return {
        "mAP": res["mAP"],
        "R1": float(cmc[0]),
        "R5": float(cmc[4]),
        "R10": float(cmc[9]),
        "mINP": res["mINP"],
        "cmc": cmc[: int(max_rank)],
        "distmat": distmat,
    }
