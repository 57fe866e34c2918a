"""Pseudo-label generation at scale: exact kNN, sparse k-reciprocal Jaccard distance, DBSCAN / k-means.

No ``N x N`` dense matrix is ever built: memory is O(N*k) beyond the features (see ``jaccard.py``).

    from lf2core.cluster import jaccard_distance, pseudo_labels, cluster_stats
    dist = jaccard_distance(feats, k1=30, k2=6)      # scipy.sparse.csr_matrix [N, N], absent = 1
    labels = pseudo_labels(feats, "dbscan")           # int64 [N], -1 = outlier
    stats = cluster_stats(labels, true_ids=pids, camids=camids)
    sets, g = training_labels({"global": labels}, "drop")   # what a round trains with (policy, renumbering)
    centroids = class_centroids(feats, sets["global"], g)   # float32 [G, D], rows L2-normalised
"""

from .jaccard import jaccard_distance
from .knn import knn
from .labels import (
    apply_outlier_policy,
    class_centroids,
    cluster_stats,
    dbscan_precomputed,
    kmeans_labels,
    pseudo_labels,
    training_labels,
)

__all__ = [
    "apply_outlier_policy",
    "class_centroids",
    "cluster_stats",
    "dbscan_precomputed",
    "jaccard_distance",
    "kmeans_labels",
    "knn",
    "pseudo_labels",
    "training_labels",
]
