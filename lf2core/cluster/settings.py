"""DBSCAN settings chosen from the unlabelled data: eps (``auto_eps``, MMT/SSG's rule with a share of
pairs from the data) and k1 (``auto_k1``, by the silhouette of the clustering). ``pseudo_labels`` calls
them for ``eps="auto"`` / ``k1="auto"``; docs/method.md section 5 has what they were measured to do."""

from __future__ import annotations

import logging
from typing import Literal, Optional

import numpy as np
import scipy.sparse as sp

from .jaccard import jaccard_distance, normalize_rows, reciprocal_pairs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ eps from the data
#: MMT's / SSG's share of the N(N-1)/2 pairwise distances whose mean becomes eps (set for Market-1501)
AUTO_EPS_RHO = 1.6e-3
#: distances stored while eps is chosen (``eps="auto"``); the full matrix is built only when fewer than
#: the needed pairs lie below it
AUTO_EPS_CAP = 0.8


def rho_eps(dist: sp.csr_matrix, rho: float = AUTO_EPS_RHO, cap: Optional[float] = None) -> Optional[float]:
    """The label-free DBSCAN eps of MMT / SSG: the mean of the smallest ``rho`` share of the ``N(N-1)/2``
    pairwise distances (pairs ``i < j``) of a symmetric sparse distance matrix whose absent entries are 1.

    ``M = max(1, round(rho * N(N-1)/2))`` pairs. ``cap``: the matrix stores only the entries ``<= cap``
    (``jaccard_distance(max_distance=cap)``); if fewer than ``M`` pairs are stored, the answer is not
    determined by it and None is returned. ``cap=None``: every pair sharing a column of V is stored, the
    others count as 1. Never builds an ``N x N`` array: ``O(nnz)``.
    """
    n = dist.shape[0]
    if n < 2:
        raise ValueError(f"rho_eps: need at least 2 samples, got {n}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho_eps: rho must be in (0, 1], got {rho}")
    vals = sp.triu(sp.csr_matrix(dist), k=1).tocoo().data.astype(np.float64)
    top = max(1, int(round(rho * n * (n - 1) / 2)))
    if top <= len(vals):
        return float(np.partition(vals, top - 1)[:top].mean())
    if cap is None:
        return float((vals.sum() + (top - len(vals))) / top)
    return None


def reciprocal_share(rank: np.ndarray, k1: int) -> float:
    """The share of pairs the data itself suggests for :func:`rho_eps`: the mean number of k-reciprocal
    neighbours of an image (``|R(i, k1)| - 1``, itself not counted) over ``N - 1``. It follows the target's
    density where a fixed share does not (MMT's 1.6e-3 is ~21 pairs per image at Market's 12,936 images
    but ~3 at 2,000). ``rank``: ``[N, K]`` kNN indices, row ``i`` starting with ``i``."""
    n = rank.shape[0]
    rows, _ = reciprocal_pairs(rank, int(k1))
    per_image = (len(rows) - n) / n
    return float(min(1.0, max(per_image, 0.5) / max(n - 1, 1)))  # at least half a pair per image


def auto_eps(features: np.ndarray, *, k1: int, k2: int, rho: float | Literal["reciprocal"] = "reciprocal",
             knn_backend: str = "auto", progress: bool = False,
             timings: Optional[dict] = None) -> tuple[float, float, sp.csr_matrix]:
    """``(eps, rho, dist)``: :func:`rho_eps` of the Jaccard distance of ``features`` with share ``rho``
    (``"reciprocal"``: :func:`reciprocal_share` of the data; a number: that share, MMT's 1.6e-3), and that
    distance (entries up to the cap, or all), ready for DBSCAN with that eps: ``dbscan_precomputed`` only
    looks at entries ``<= eps``, so the labels equal those of the full matrix. One kNN search; the min-sum
    runs with the cap ``AUTO_EPS_CAP`` and again uncapped only if fewer than the needed pairs lie below
    the cap."""
    from .knn import knn

    x = normalize_rows(features)
    found = knn(x, min(int(k1), x.shape[0]), backend=knn_backend, progress=progress)  # type: ignore[arg-type]
    if rho == "reciprocal":
        rho = reciprocal_share(found[1], min(int(k1), x.shape[0]))
    eps: Optional[float] = None
    for cap in (AUTO_EPS_CAP, None):
        dist = jaccard_distance(x, k1=k1, k2=k2, knn_result=found, progress=progress, max_distance=cap,
                                timings=timings)
        eps = rho_eps(dist, rho, cap)
        if eps is not None:
            break
    assert eps is not None  # an uncapped matrix always determines it
    return eps, float(rho), dist


# ------------------------------------------------------------------------------------------ k1 from the data
#: the k1 values ``k1="auto"`` chooses from (each clipped to N; the paper's 30 for Market is among them)
AUTO_K1_GRID = (10, 15, 20, 25, 30, 40)
#: images the silhouette of ``k1="auto"`` is computed on (a seeded sample when there are more: O(sample^2))
AUTO_K1_SAMPLE = 5000


def clustering_silhouette(features: np.ndarray, labels: np.ndarray, *, sample: int = AUTO_K1_SAMPLE,
                          seed: int = 0) -> float:
    """The mean silhouette (cosine) of a clustering over ALL its images, an outlier (-1) counting 0: how
    well the images sit in their clusters, lowered by the share left out, with no labels needed. With more
    than ``sample`` images, a seeded sample of that size. ``features`` ``[N, d]``, ``labels`` ``[N]`` -> float."""
    from sklearn.metrics import silhouette_samples

    lab = np.asarray(labels)
    idx = np.arange(len(lab))
    if len(idx) > sample:
        idx = np.sort(np.random.default_rng(seed).choice(len(lab), size=sample, replace=False))
    x, lab = np.asarray(features)[idx], lab[idx]
    keep = lab >= 0
    clusters = len(np.unique(lab[keep]))
    if clusters < 2 or clusters >= keep.sum():
        return 0.0  # silhouette is undefined for fewer than 2 clusters or all singletons
    return float(silhouette_samples(x[keep], lab[keep], metric="cosine").sum() / len(lab))


def auto_k1(features: np.ndarray, *, k2: int, eps: float | Literal["auto"], min_samples: int,
            eps_rho: float | Literal["reciprocal"] = "reciprocal", grid: tuple[int, ...] = AUTO_K1_GRID,
            knn_backend: str = "auto", seed: int = 0) -> tuple[int, np.ndarray, dict]:
    """``k1`` chosen from the data without labels: DBSCAN (with ``eps``, ``"auto"`` re-chosen for each k1)
    on the Jaccard distance for every k1 of ``grid`` (clipped to N), keeping the clustering with the highest
    :func:`clustering_silhouette` (ties: the smaller k1). A small k1 keeps only tight neighbourhoods (few,
    pure clusters, many outliers), a large one merges identities; the silhouette over all images
    penalises both. On well-separated identities the k1 chosen grows with their size; on features that
    group by camera it picks a small k1 whose clusters stay inside cameras (docs/method.md). Returns
    ``(k1, labels [N] int64, chosen)``, ``chosen`` = ``{"k1", "eps", ["eps_rho"], "k1_silhouette": {k1: score}}``."""
    from .labels import pseudo_labels  # labels.pseudo_labels calls this for k1="auto"

    x = normalize_rows(features)
    n = x.shape[0]
    best: Optional[tuple[float, int, np.ndarray, dict]] = None
    scores: dict[int, float] = {}
    for k1 in sorted({min(int(k), n) for k in grid}):
        ch: dict = {}
        lab = pseudo_labels(x, "dbscan", k1=k1, k2=k2, eps=eps, min_samples=min_samples, eps_rho=eps_rho,
                            knn_backend=knn_backend, chosen=ch)
        scores[k1] = round(clustering_silhouette(x, lab, seed=seed), 6)
        log.info("k1=auto: k1 %d -> %d clusters, %.1f%% outliers, eps %.3f, silhouette %.4f", k1,
                 len(np.unique(lab[lab >= 0])), 100 * float((lab < 0).mean()), ch["eps"], scores[k1])
        if best is None or scores[k1] > best[0]:
            best = (scores[k1], k1, lab, ch)
    assert best is not None
    _, k1, lab, ch = best
    return k1, lab, {**ch, "k1": k1, "k1_silhouette": scores}
