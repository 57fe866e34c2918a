"""Stage cluster: pseudo labels for the three LF2 fusion feature sets of one round.

``cluster(cfg, features, out, round_index=0)``

- ``features``: an extract-features output directory (or the ``features.npz`` file itself): float32
  ``global``, ``upper``, ``lower`` [N, C] (``part1..partK`` for K != 2), int64 ``pids``, ``camids`` [N].
- each feature set is clustered independently with ``cfg.cluster``: ``dbscan`` (sparse k-reciprocal
  Jaccard distance, k1/k2/eps/min_samples) or ``kmeans`` (MiniBatchKMeans, ``num_clusters`` K,
  ``kmeans_batch_size``, ``kmeans_max_iter``, ``kmeans_n_init``, seed ``cfg.seed + round_index``).
  k-means init_size: ``cfg.cluster.kmeans_init_size`` for ``global`` and ``round(init_size * 900/1500)``
  for the parts, the ratio of the released code (1500 global / 900 parts). ``ground_truth``: every set
  labelled with the target TRAIN identities (needs them): a diagnostic upper bound of the fine-tuning
  recipe with perfect pseudo labels, used by ``bench/uda_synthetic.py`` -- not domain adaptation.
- ``out/labels.npz``: int64 label vectors with the same names (-1 = DBSCAN outlier, kept; the outlier
  policy ``cfg.cluster.outliers`` is applied by the consumer with ``lf2core.cluster.apply_outlier_policy``).
- ``out/stats.json``: ``{"round": r, "method": ..., "global": stats, "upper": ..., "lower": ...}`` with
  ``lf2core.cluster.cluster_stats`` (NMI/ARI/pairwise P-R when all ``pids >= 0``, ``nmi_camera`` when all
  ``camids >= 0``) plus the wall time of each set.
- ``out/cluster_stats.png``: ``lf2core.plots.cluster_stats_png``.

Returns flat metrics ``{"global/num_clusters": ..., "global/outlier_ratio": ..., ...}`` (scalars only).
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from ..cluster import cluster_stats, pseudo_labels
from ..config import Config
from ..errors import DataError

log = logging.getLogger(__name__)

#: part k-means init_size relative to the global one (released code: 1500 global, 900 parts)
PART_INIT_RATIO = 900 / 1500


def _features_file(features: str) -> str:
    if str(features).endswith(".npz"):
        return str(features)
    return storage.join(features, "features.npz")


def load_features(features: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Read features.npz -> ({name: [N, C] float32}, pids [N] int64, camids [N] int64).

    Raises DataError naming the file when it is missing, unreadable, or inconsistent."""
    uri = _features_file(features)
    arrays, _ = storage.read_npz(uri, "features")
    for key in ("global", "pids", "camids"):
        if key not in arrays:
            raise DataError(f"{uri}: missing array '{key}' (found: {', '.join(sorted(arrays)) or 'none'})")
    names = [k for k in arrays if k not in ("pids", "camids")]
    names = ["global"] + [k for k in names if k != "global"]
    n = arrays["global"].shape[0] if arrays["global"].ndim == 2 else -1
    feats: dict[str, np.ndarray] = {}
    for k in names:
        a = arrays[k]
        if a.ndim != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{uri}: array '{k}' must be a float [N, C] matrix with N = {n}, got {a.dtype} {a.shape}")
        if not np.isfinite(a).all():
            raise DataError(f"{uri}: array '{k}' contains NaN or infinite values")
        feats[k] = a
    pids, camids = arrays["pids"], arrays["camids"]
    for k, a in (("pids", pids), ("camids", camids)):
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{uri}: array '{k}' must be an integer vector of length {n}, got {a.dtype} {a.shape}")
    return feats, pids.astype(np.int64), camids.astype(np.int64)


def cluster(cfg: Config, features: str, out: str, round_index: int = 0) -> dict[str, Any]:
    """Cluster every feature set of ``features``; write labels.npz, stats.json, cluster_stats.png."""
    feats, pids, camids = load_features(features)
    n = len(pids)
    c = cfg.cluster
    if c.method == "kmeans" and c.num_clusters > n:
        raise DataError(
            f"config key 'cluster.num_clusters': {c.num_clusters} clusters for {n} samples in {_features_file(features)}"
        )
    true_ids = pids if n and (pids >= 0).all() else None
    cams = camids if n and (camids >= 0).all() else None
    if c.method == "ground_truth":
        if true_ids is None:
            raise DataError(f"{_features_file(features)}: cluster.method=ground_truth needs an identity for every "
                            "target train image")
        log.warning("cluster.method=ground_truth: labels are the target TRAIN identities (a diagnostic upper "
                    "bound of the fine-tuning recipe, not domain adaptation)")
    labels: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {"round": int(round_index), "method": c.method}
    for name, x in feats.items():
        t0 = time.perf_counter()
        init = c.kmeans_init_size if name == "global" else int(round(c.kmeans_init_size * PART_INIT_RATIO))
        try:
            lab = _ground_truth(true_ids) if c.method == "ground_truth" else pseudo_labels(
                x, c.method, k1=c.k1, k2=c.k2, eps=c.eps, min_samples=c.min_samples,
                num_clusters=c.num_clusters if c.method == "kmeans" else None, seed=cfg.seed + int(round_index),
                kmeans_batch_size=c.kmeans_batch_size, kmeans_max_iter=c.kmeans_max_iter,
                kmeans_n_init=c.kmeans_n_init, kmeans_init_size=init,
            )
        except ValueError as e:
            raise DataError(f"{_features_file(features)}: cannot cluster '{name}': {e}") from None
        labels[name] = lab.astype(np.int64)
        s = cluster_stats(lab, true_ids=true_ids, camids=cams)
        s["seconds"] = round(time.perf_counter() - t0, 3)
        stats[name] = s
        log.info("cluster %s: %d clusters, %.1f%% outliers (%.1fs)", name, s["num_clusters"],
                 100 * s["outlier_ratio"], s["seconds"])

    with storage.output_dir(out, "cluster") as tmp:
        tmp = Path(tmp)
        buf = io.BytesIO()
        np.savez(buf, **labels)
        (tmp / "labels.npz").write_bytes(buf.getvalue())
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        _plot(tmp / "cluster_stats.png", stats)

    metrics: dict[str, Any] = {}
    for name in labels:
        for key, val in stats[name].items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                metrics[f"{name}/{key}"] = val
    return metrics


def _ground_truth(true_ids: Any) -> np.ndarray:
    """The true identities renumbered 0..n_ids-1 (int64 [N])."""
    return np.unique(true_ids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _plot(path: Path, stats: dict[str, Any]) -> None:
    """cluster_stats.png via lf2core.plots (the project's plotting module)."""
    from .. import plots

    plots.cluster_stats_png(str(path), [stats])
