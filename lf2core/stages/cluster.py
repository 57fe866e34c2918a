"""Stage cluster: pseudo labels for the three LF2 fusion feature sets of one round.

``cluster(cfg, features, out, round_index=0)``

- ``features``: an extract-features output directory (or the ``features.npz`` file itself): float32
  ``global``, ``upper``, ``lower`` [N, C] (``part1..partK`` for K != 2), int64 ``pids``, ``camids`` [N].
- each feature set is clustered independently with ``cfg.cluster`` (after ``camera_normalised`` when
  ``cluster.camera_norm`` is ``center`` or ``standardise``): ``dbscan`` (sparse k-reciprocal
  Jaccard distance, k1/k2/eps/min_samples; ``eps: auto`` chooses eps per set and round from the
  unlabelled distances, ``lf2core.cluster.settings.auto_eps`` with ``eps_rho``; the value used is in the
  stats as ``eps``, with ``eps_pairs_per_image`` = the share x (N - 1); ``k1: auto`` chooses k1 per set and
  round by the silhouette of the clustering, ``lf2core.cluster.settings.auto_k1``; the value used is in the
  stats as ``k1``, the silhouette of every k1 tried as ``k1_silhouette``) or ``kmeans`` (MiniBatchKMeans, ``num_clusters`` K,
  ``kmeans_batch_size``, ``kmeans_max_iter``, ``kmeans_n_init``, seed ``cfg.seed + round_index``).
  k-means init_size: ``cfg.cluster.kmeans_init_size`` for ``global`` and ``round(init_size * 900/1500)``
  for the parts, the ratio of the released code (1500 global / 900 parts). ``ground_truth``: every set
  labelled with the target TRAIN identities (needs them): a diagnostic upper bound of the fine-tuning
  recipe with perfect pseudo labels, used by ``bench/uda_synthetic.py`` -- not domain adaptation.
- ``out/labels.npz`` (``lf2core.artifacts.PseudoLabels``): the TRAINING labels, int64 vectors with the same
  names -- ``lf2core.cluster.training_labels``: the outlier policy ``cfg.cluster.outliers`` applied
  (``drop``: -1 kept, never sampled; ``singleton``: a class each), the global labels numbered 0..G-1 -- and
  float32 ``centroids`` [G, C], the classifier initialisation of the round, by ``cfg.cluster.classifier_init``:
  ``class_means`` (default): the L2-normalised mean ``global`` feature of each global class
  (``lf2core.cluster.class_centroids``; empty k-means clusters are dropped and the labels renumbered);
  ``centres`` (released; kmeans only): the L2-normalised k-means centres of the ``global`` set over all K
  clusters, empty ones included, and the ``global`` labels kept as k-means numbered them (G = K; rows
  past the largest label are empty clusters).
- ``out/stats.json``: ``{"round": r, "method": ..., "global": stats, "upper": ..., "lower": ...}`` with
  ``lf2core.cluster.cluster_stats`` (NMI/ARI/pairwise P-R when all ``pids >= 0``, ``nmi_camera`` when all
  ``camids >= 0``) of the clustering itself (before the outlier policy) plus the wall time of each set.
- ``out/cluster_stats.png``: ``lf2core.plots.cluster_stats_png``.

Returns flat metrics ``{"global/num_clusters": ..., "global/outlier_ratio": ..., ...}`` (scalars only).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifacts, storage
from ..cluster import class_centroids, cluster_stats, pseudo_labels, training_labels
from ..config import Config
from ..errors import DataError
from .table import CLUSTER

log = logging.getLogger(__name__)

#: part k-means init_size relative to the global one (released code: 1500 global, 900 parts)
PART_INIT_RATIO = 900 / 1500


def cluster(cfg: Config, features: str, out: str, round_index: int = 0) -> dict[str, Any]:
    """Cluster every feature set of ``features``; write labels.npz, stats.json, cluster_stats.png."""
    fs = artifacts.read_features(features)
    feats, pids, camids = fs.sets, fs.pids, fs.camids
    where = artifacts.locate(features, artifacts.FEATURES)
    n = len(pids)
    c = cfg.cluster
    if c.method == "kmeans" and c.num_clusters > n:
        raise DataError(
            f"config key 'cluster.num_clusters': {c.num_clusters} clusters for {n} samples in {where}"
        )
    true_ids = pids if n and (pids >= 0).all() else None
    cams = camids if n and (camids >= 0).all() else None
    if c.method == "ground_truth":
        if true_ids is None:
            raise DataError(f"{where}: cluster.method=ground_truth needs an identity for every "
                            "target train image")
        log.warning("cluster.method=ground_truth: labels are the target TRAIN identities (a diagnostic upper "
                    "bound of the fine-tuning recipe, not domain adaptation)")
    labels: dict[str, np.ndarray] = {}
    centres = None
    use_centres = c.classifier_init == "centres"
    if use_centres and c.method != "kmeans":
        raise DataError(f"config key 'cluster.classifier_init': centres needs cluster.method=kmeans, got {c.method}")
    if c.camera_norm != "none" and cams is None:
        raise DataError(f"{where}: config key 'cluster.camera_norm' = {c.camera_norm} needs the camera of every "
                        "target train image (some camids < 0)")
    stats: dict[str, Any] = {"round": int(round_index), "method": c.method}
    for name, raw in feats.items():
        x = raw if c.camera_norm == "none" else camera_normalised(raw, cams, c.camera_norm)
        t0 = time.perf_counter()
        chosen: dict[str, float] = {}
        init = c.kmeans_init_size if name == "global" else int(round(c.kmeans_init_size * PART_INIT_RATIO))
        try:
            lab = _ground_truth(true_ids) if c.method == "ground_truth" else pseudo_labels(
                x, c.method, k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples,
                num_clusters=c.num_clusters if c.method == "kmeans" else None, seed=cfg.seed + int(round_index),
                kmeans_batch_size=c.kmeans_batch_size, kmeans_max_iter=c.kmeans_max_iter,
                kmeans_n_init=c.kmeans_n_init, kmeans_init_size=init, eps_rho=c.eps_rho, chosen=chosen,
                **({"return_centres": True} if use_centres and name == "global" else {}),
            )
        except ValueError as e:
            raise DataError(f"{where}: cannot cluster '{name}': {e}") from None
        if isinstance(lab, tuple):
            lab, centres = lab
        labels[name] = lab.astype(np.int64)
        s = cluster_stats(lab, true_ids=true_ids, camids=cams)
        if c.method == "dbscan":
            s["eps"] = round(chosen["eps"], 6)  # the value used (chosen from the data with eps=auto)
            if "eps_rho" in chosen:
                s["eps_pairs_per_image"] = round(chosen["eps_rho"] * (n - 1), 3)
            s["k1"] = int(chosen["k1"])  # the value used (chosen from the data with k1=auto)
            if "k1_silhouette" in chosen:
                s["k1_silhouette"] = {str(k): v for k, v in chosen["k1_silhouette"].items()}
        s["seconds"] = round(time.perf_counter() - t0, 3)
        stats[name] = s
        log.info("cluster %s: %d clusters, %.1f%% outliers (%.1fs)", name, s["num_clusters"],
                 100 * s["outlier_ratio"], s["seconds"])

    sets, num_classes = training_labels(labels, c.outliers)
    if centres is not None:  # released: all K centres, labels as k-means numbered them
        sets["global"] = labels["global"].copy()
        centroids = _normalised(centres)
    else:
        centroids = class_centroids(feats["global"], sets["global"], num_classes)
    with storage.output_dir(out, CLUSTER) as tmp:
        artifacts.write_labels(tmp, artifacts.PseudoLabels(sets, centroids))
        artifacts.write_cluster_stats(tmp, stats)
        _plot(Path(tmp) / artifacts.CLUSTER_PLOT, stats)

    metrics: dict[str, Any] = {}
    for name in labels:
        for key, val in stats[name].items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                metrics[f"{name}/{key}"] = val
    return metrics


def camera_normalised(x: np.ndarray, camids: np.ndarray, how: str) -> np.ndarray:
    """Clustering features with each camera's own statistics removed: per camera, ``center`` subtracts the
    camera's mean feature ``[C]``; ``standardise`` also divides every dimension by the camera's standard
    deviation (floored at 1e-6); a camera with one image is left as it is. Rows are then L2-normalised. ``x`` ``[N, C]``, ``camids`` ``[N]`` -> float32
    ``[N, C]``. Only the labels are computed from these; the classifier initialisation uses the raw features.
    """
    out = np.asarray(x, dtype=np.float64).copy()
    for cam in np.unique(camids):
        rows = camids == cam
        if rows.sum() < 2:  # no statistics from one image: left as it is
            continue
        out[rows] -= out[rows].mean(axis=0)
        if how == "standardise":
            out[rows] /= np.maximum(out[rows].std(axis=0), 1e-6)
    return _normalised(out)


def _normalised(rows: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (float32; a zero row stays zero)."""
    r = np.asarray(rows, dtype=np.float64)
    n = np.linalg.norm(r, axis=1, keepdims=True)
    return (r / np.maximum(n, 1e-12)).astype(np.float32)


def _ground_truth(true_ids: Any) -> np.ndarray:
    """The true identities renumbered 0..n_ids-1 (int64 [N])."""
    return np.unique(true_ids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _plot(path: Path, stats: dict[str, Any]) -> None:
    """cluster_stats.png via lf2core.plots (the project's plotting module)."""
    from .. import plots

    plots.cluster_stats_png(str(path), [stats])
