"""Pseudo labels (DBSCAN on the sparse Jaccard distance, or MiniBatchKMeans) and cluster statistics."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Literal, Mapping, Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .jaccard import jaccard_distance, normalize_rows
from .knn import _as_features
# the DBSCAN settings chosen from the data live in .settings; re-exported here, where they were first
from .settings import (  # noqa: F401
    AUTO_EPS_CAP, AUTO_EPS_RHO, AUTO_K1_GRID, AUTO_K1_SAMPLE, auto_eps, auto_k1, clustering_silhouette,
    reciprocal_share, rho_eps,
)

log = logging.getLogger(__name__)

Method = Literal["dbscan", "kmeans"]
OutlierPolicy = Literal["drop", "singleton"]


# ------------------------------------------------------------------------------------------ DBSCAN
def dbscan_precomputed(dist: sp.csr_matrix, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
    """DBSCAN on a sparse precomputed distance matrix; labels identical to ``sklearn.cluster.DBSCAN``.

    Same semantics as sklearn with ``metric="precomputed"`` on a sparse matrix: only stored entries
    (explicit zeros included) with distance ``<= eps`` are neighbours, a point is its own neighbour
    when its diagonal entry is ``<= eps`` (an absent diagonal counts as 0), a point with ``>= min_samples`` neighbours is a core point. Core points connected through
    core-to-core edges form a cluster; clusters are numbered in the order of their lowest core index
    (sklearn's scan order); a border point joins the lowest-numbered cluster among its core neighbours
    (the first cluster sklearn's depth-first expansion reaches it from); everything else is -1.

    Vectorised: neighbour counts by ``bincount``, clusters by
    ``scipy.sparse.csgraph.connected_components`` — no per-point Python loop, no neighbourhood lists.

    Args:
        dist: ``[N, N]`` CSR (or any sparse) distance matrix, row ``i`` = distances from ``i``.
    Returns:
        ``[N]`` int64 labels, -1 = outlier.
    """
    if not sp.issparse(dist) or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dbscan_precomputed: expected a square sparse matrix, got {getattr(dist, 'shape', None)}")
    if min_samples < 1:
        raise ValueError(f"dbscan_precomputed: min_samples must be >= 1, got {min_samples}")
    dist = sp.csr_matrix(dist)
    n = dist.shape[0]
    close = np.flatnonzero(dist.data <= eps)  # few entries: only these are expanded to (row, col)
    rows = np.searchsorted(dist.indptr, close, side="right").astype(np.int64) - 1
    cols = dist.indices[close].astype(np.int64)
    del close
    off = rows != cols  # the point itself is counted once, from the diagonal, as sklearn does
    rows, cols = rows[off], cols[off]
    # the diagonal is the point's distance to itself (absent = 0); 0 for a Jaccard matrix
    n_neigh = np.bincount(rows, minlength=n) + (dist.diagonal() <= eps)
    core = n_neigh >= min_samples
    labels = np.full(n, -1, dtype=np.int64)
    if not core.any():
        return labels
    # clusters: components of the core -> core graph (sklearn follows the rows of core points)
    cc = core[rows] & core[cols]
    g = sp.csr_matrix((np.ones(int(cc.sum()), dtype=np.int8), (rows[cc], cols[cc])), shape=(n, n))
    _, comp = connected_components(g, directed=True, connection="weak")
    core_idx = np.flatnonzero(core)
    # number the components of core points by their lowest core index
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, comp[core_idx], core_idx)
    used = np.flatnonzero(first < n)
    order = used[np.argsort(first[used], kind="stable")]
    rename = np.full(n, -1, dtype=np.int64)
    rename[order] = np.arange(len(order), dtype=np.int64)
    labels[core_idx] = rename[comp[core_idx]]
    # border points: reached from a core point's row; take the lowest cluster number
    bd = core[rows] & ~core[cols]
    if bd.any():
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, cols[bd], labels[rows[bd]])
        hit = best != np.iinfo(np.int64).max
        labels[hit] = best[hit]
    return labels


# ------------------------------------------------------------------------------------------ k-means
def kmeans_labels(
    features: np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    batch_size: int = 300,
    max_iter: int = 100,
    n_init: int = 1,
    init_size: Optional[int] = None,
    return_centres: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """MiniBatchKMeans labels as the paper (K given, n_init explicit, seeded). ``[N, d]`` -> ``[N]`` int64.

    ``init_size`` None -> sklearn's default (3 * batch_size); it is raised to ``num_clusters`` when
    smaller (sklearn would silently use 3 * K) and capped at N. ``return_centres``: also return the
    fitted centres (float32 [K, d], empty clusters included).
    """
    from sklearn.cluster import MiniBatchKMeans

    x = _as_features(features)
    n = x.shape[0]
    if num_clusters is None or isinstance(num_clusters, bool) or int(num_clusters) < 2:
        raise ValueError(f"pseudo_labels(method='kmeans'): num_clusters must be an integer >= 2, got {num_clusters!r}")
    num_clusters = int(num_clusters)
    if num_clusters > n:
        raise ValueError(f"pseudo_labels(method='kmeans'): num_clusters={num_clusters} exceeds the {n} samples")
    if init_size is not None:
        init_size = int(min(max(init_size, num_clusters), n))
    km = MiniBatchKMeans(
        n_clusters=num_clusters,
        batch_size=batch_size,
        max_iter=max_iter,
        n_init=n_init,
        init_size=init_size,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        labels = km.fit_predict(x).astype(np.int64)
    return (labels, km.cluster_centers_.astype(np.float32)) if return_centres else labels


# ------------------------------------------------------------------------------------------ public
def pseudo_labels(
    features: np.ndarray,
    method: Method = "dbscan",
    *,
    k1: int | Literal["auto"] = 30,
    k2: int = 6,
    eps: float | Literal["auto"] = 0.6,
    min_samples: int = 4,
    num_clusters: Optional[int] = None,
    seed: int = 0,
    kmeans_batch_size: int = 300,
    kmeans_max_iter: int = 100,
    kmeans_n_init: int = 1,
    kmeans_init_size: Optional[int] = None,
    knn_backend: str = "auto",
    progress: bool = False,
    timings: Optional[dict] = None,
    return_centres: bool = False,
    eps_rho: float | Literal["reciprocal"] = "reciprocal",
    chosen: Optional[dict] = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pseudo labels of the rows of ``features`` ``[N, d]`` -> ``[N]`` int64 (-1 = DBSCAN outlier).

    ``method="dbscan"``: DBSCAN(eps, min_samples) on :func:`jaccard_distance` (k1, k2), sparse.
    ``eps="auto"``: eps chosen from the data without labels (:func:`auto_eps`, share ``eps_rho``); the
    values used are stored in ``chosen["eps"]`` (and ``chosen["eps_rho"]``) when a dict is given (a
    number eps is stored there too).
    ``k1="auto"``: k1 chosen from the data without labels (:func:`auto_k1`; ``chosen["k1"]`` and
    ``chosen["k1_silhouette"]``); a number k1 is stored in ``chosen["k1"]`` too.
    ``method="kmeans"``: MiniBatchKMeans with ``num_clusters`` clusters on the L2-normalised features
    (``kmeans_*``: batch size, max iterations, n_init, init_size), seeded with ``seed``; no outliers.
    Outliers are kept as -1: see :func:`apply_outlier_policy`.
    ``timings``: if a dict is given (DBSCAN only), the wall times of :func:`jaccard_distance` and
    ``dbscan_s`` are stored in it. ``return_centres`` (kmeans only): return ``(labels, centres [K, d])``.
    """
    if method == "dbscan":
        if k1 == "auto":
            _, labels, found = auto_k1(features, k2=k2, eps=eps, min_samples=min_samples, eps_rho=eps_rho,
                                       knn_backend=knn_backend, seed=seed)
            if chosen is not None:
                chosen.update(found)
            return labels
        if isinstance(k1, str):
            raise ValueError(f"pseudo_labels: k1 must be an integer >= 1 or 'auto', got {k1!r}")
        if chosen is not None:
            chosen["k1"] = int(k1)
        if eps == "auto":
            eps, eps_rho, dist = auto_eps(features, k1=k1, k2=k2, rho=eps_rho, knn_backend=knn_backend,
                                          progress=progress, timings=timings)
            if chosen is not None:
                chosen["eps_rho"] = float(eps_rho)
        elif isinstance(eps, str) or not 0.0 < eps:
            raise ValueError(f"pseudo_labels: eps must be > 0 or 'auto', got {eps!r}")
        else:
            # entries > eps are never DBSCAN neighbours: not storing them gives the same labels in less memory
            dist = jaccard_distance(features, k1=k1, k2=k2, knn_backend=knn_backend, progress=progress,
                                    max_distance=eps, timings=timings)
        if chosen is not None:
            chosen["eps"] = float(eps)
        t0 = time.perf_counter()
        labels = dbscan_precomputed(dist, eps=eps, min_samples=min_samples)
        if timings is not None:
            timings["dbscan_s"] = time.perf_counter() - t0
        return labels
    if method == "kmeans":
        return kmeans_labels(
            normalize_rows(features), num_clusters, seed=seed, batch_size=kmeans_batch_size,  # type: ignore[arg-type]
            max_iter=kmeans_max_iter, n_init=kmeans_n_init, init_size=kmeans_init_size, return_centres=return_centres,
        )
    raise ValueError(f"pseudo_labels: unknown method {method!r} (expected 'dbscan' or 'kmeans')")


def apply_outlier_policy(labels: np.ndarray, policy: OutlierPolicy) -> np.ndarray:
    """Apply the outlier policy to labels with -1 outliers; returns a new int64 array.

    ``"drop"``: labels unchanged (-1 stays; samplers never draw labels < 0).
    ``"singleton"``: every outlier gets a class of its own, numbered after the largest label.
    """
    labels = np.asarray(labels).astype(np.int64)
    if policy == "drop":
        return labels.copy()
    if policy == "singleton":
        out = labels.copy()
        mask = out < 0
        start = int(out.max()) + 1 if (~mask).any() else 0
        out[mask] = start + np.arange(int(mask.sum()), dtype=np.int64)
        return out
    raise ValueError(f"apply_outlier_policy: unknown policy {policy!r} (expected 'drop' or 'singleton')")


#: the per-label-set statistics of a round's clustering that are reported (run summary, MLflow): counts
#: and quality from ``cluster_stats``, and the DBSCAN eps and k1 the cluster stage used (chosen with
#: eps=auto / k1=auto)
REPORTED_STATS = ("num_clusters", "outlier_ratio", "nmi", "ari", "nmi_camera", "pairwise_precision",
                  "pairwise_recall", "eps", "eps_pairs_per_image", "k1")


def _run_lengths(keys: np.ndarray) -> np.ndarray:
    """Multiplicities of the distinct values of an int array (sort + run lengths)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    k = np.sort(keys)
    edges = np.flatnonzero(np.diff(k)) + 1
    return np.diff(np.concatenate([[0], edges, [len(k)]]))


def _pairs(counts: np.ndarray) -> float:
    c = counts.astype(np.float64)
    return float(np.sum(c * (c - 1.0) / 2.0))


def cluster_stats(labels: np.ndarray, true_ids: Optional[np.ndarray] = None,
                  camids: Optional[np.ndarray] = None) -> dict:
    """Statistics of a labelling ``[N]`` (-1 = outlier), O(N) via contingency tables.

    Returns ``num_clusters``, ``num_samples``, ``outlier_ratio``, ``size_hist`` (``[[size, count], ...]``
    over clusters, sizes ascending) and, when ``true_ids`` ``[N]`` are given:

    - ``nmi``, ``ari``: sklearn NMI (arithmetic) / ARI of clusters vs identities over the clustered
      (non-outlier) samples; 0.0 when nothing is clustered;
    - ``pairwise_precision`` = same-cluster pairs that share the identity / same-cluster pairs,
      ``pairwise_recall`` = same-identity pairs that share a cluster / same-identity pairs, over all
      samples (an outlier pairs with nobody, so outliers lower recall); 0.0 when a denominator is 0;

    and when ``camids`` ``[N]`` are given ``nmi_camera``: NMI of clusters vs camera ids over the clustered
    samples (high = clusters follow cameras rather than identities).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"cluster_stats: labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
    n = len(lab)
    clustered = lab >= 0
    sizes = _run_lengths(lab[clustered].astype(np.int64))
    hist_sizes, hist_counts = np.unique(sizes, return_counts=True)
    stats: dict = {
        "num_samples": int(n),
        "num_clusters": int(len(sizes)),
        "outlier_ratio": float(1.0 - clustered.mean()) if n else 0.0,
        "size_hist": [[int(s), int(c)] for s, c in zip(hist_sizes, hist_counts)],
    }
    if true_ids is not None:
        t = np.asarray(true_ids)
        if t.shape != lab.shape:
            raise ValueError(f"cluster_stats: true_ids shape {t.shape} != labels shape {lab.shape}")
        if clustered.any():
            stats["nmi"] = float(normalized_mutual_info_score(t[clustered], lab[clustered]))
            stats["ari"] = float(adjusted_rand_score(t[clustered], lab[clustered]))
        else:
            stats["nmi"] = stats["ari"] = 0.0
        # contingency table of (cluster, identity) over clustered samples
        _, t_index = np.unique(t, return_inverse=True)
        t_index = t_index.reshape(-1).astype(np.int64)
        n_ids = int(t_index.max()) + 1 if n else 1
        cell = _run_lengths(lab[clustered].astype(np.int64) * n_ids + t_index[clustered])
        id_sizes = np.bincount(t_index, minlength=n_ids)
        tp, pred, true = _pairs(cell), _pairs(sizes), _pairs(id_sizes)
        stats["pairwise_precision"] = tp / pred if pred > 0 else 0.0
        stats["pairwise_recall"] = tp / true if true > 0 else 0.0
    if camids is not None:
        c = np.asarray(camids)
        if c.shape != lab.shape:
            raise ValueError(f"cluster_stats: camids shape {c.shape} != labels shape {lab.shape}")
        stats["nmi_camera"] = (
            float(normalized_mutual_info_score(c[clustered], lab[clustered])) if clustered.any() else 0.0
        )
    return stats


# ------------------------------------------------------------------------------------------ training labels
def training_labels(raw: Mapping[str, np.ndarray], policy: OutlierPolicy) -> tuple[dict[str, np.ndarray], int]:
    """The labels a round trains with, from clustering labels (-1 = outlier): the outlier policy
    (``apply_outlier_policy``) applied to every set, then the ``global`` labels renumbered 0..G-1 in
    order of label value (empty k-means clusters disappear), -1 kept. Returns ({name: int64 [N]}, G)."""
    sets = {name: apply_outlier_policy(np.asarray(a), policy) for name, a in raw.items()}
    g = sets["global"]
    valid = g >= 0
    uniq, inv = np.unique(g[valid], return_inverse=True)
    renum = np.full_like(g, -1)
    renum[valid] = inv
    sets["global"] = renum
    return sets, int(len(uniq))


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean feature per class 0..num_classes-1 (labels < 0 ignored; sums in float64), rows
    L2-normalised: float32 [num_classes, D] from ``features`` [N, D] and ``labels`` [N]."""
    import torch
    import torch.nn.functional as F

    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    keep = y >= 0
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    sums.index_add_(0, y[keep], f[keep].double())
    return F.normalize(sums.float(), dim=1).numpy()
