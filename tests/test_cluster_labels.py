"""cluster_stats against brute force / sklearn, outlier policies, k-means determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from lf2core.cluster import apply_outlier_policy, cluster_stats, pseudo_labels


def _brute_pairwise(labels, ids):
    tp = pred = true = 0
    for a, b in itertools.combinations(range(len(labels)), 2):
        same_c = labels[a] >= 0 and labels[a] == labels[b]
        same_t = ids[a] == ids[b]
        tp += same_c and same_t
        pred += same_c
        true += same_t
    return (tp / pred if pred else 0.0), (tp / true if true else 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_stats_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 90))
    ids = rng.integers(0, 8, size=n)
    labels = np.where(rng.uniform(size=n) < 0.7, ids, rng.integers(0, 12, size=n))  # noisy copy of ids
    labels[rng.uniform(size=n) < 0.2] = -1
    cams = rng.integers(0, 3, size=n)
    s = cluster_stats(labels, true_ids=ids, camids=cams)
    p, r = _brute_pairwise(labels, ids)
    assert s["pairwise_precision"] == pytest.approx(p, abs=1e-12)
    assert s["pairwise_recall"] == pytest.approx(r, abs=1e-12)
    keep = labels >= 0
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(ids[keep], labels[keep]))
    assert s["ari"] == pytest.approx(adjusted_rand_score(ids[keep], labels[keep]))
    assert s["nmi_camera"] == pytest.approx(normalized_mutual_info_score(cams[keep], labels[keep]))
    assert s["outlier_ratio"] == pytest.approx(np.mean(labels < 0))
    sizes = [int(np.sum(labels == c)) for c in set(labels[keep].tolist())]
    assert s["num_clusters"] == len(sizes)
    assert s["size_hist"] == [[k, sizes.count(k)] for k in sorted(set(sizes))]


def test_stats_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, -1])
    ids = np.array([5, 5, 6, 6, 6, 6])
    s = cluster_stats(labels, true_ids=ids)
    # same-cluster pairs: (0,1) (0,2) (1,2) (3,4) -> 2 correct of 4; same-id pairs: 1 + 6 = 7
    assert s["pairwise_precision"] == 0.5 and s["pairwise_recall"] == pytest.approx(2 / 7)
    assert s["num_clusters"] == 2 and s["size_hist"] == [[2, 1], [3, 1]]
    assert s["outlier_ratio"] == pytest.approx(1 / 6)
    assert "nmi_camera" not in s
    none = cluster_stats(np.full(4, -1), true_ids=np.arange(4), camids=np.zeros(4, int))
    assert none["num_clusters"] == 0 and none["outlier_ratio"] == 1.0 and none["nmi"] == 0.0


def test_camera_nmi_flags_camera_clusters():
    cams = np.repeat(np.arange(4), 25)
    ids = np.tile(np.arange(25), 4)
    by_camera = cluster_stats(cams.copy(), true_ids=ids, camids=cams)
    by_id = cluster_stats(ids.copy(), true_ids=ids, camids=cams)
    assert by_camera["nmi_camera"] == pytest.approx(1.0) and by_camera["nmi"] < 0.1
    assert by_id["nmi_camera"] < 0.1 and by_id["nmi"] == pytest.approx(1.0)


def test_outlier_policies():
    lab = np.array([2, -1, 0, -1, 2])
    assert apply_outlier_policy(lab, "drop").tolist() == [2, -1, 0, -1, 2]
    assert apply_outlier_policy(lab, "singleton").tolist() == [2, 3, 0, 4, 2]
    assert apply_outlier_policy(np.array([-1, -1]), "singleton").tolist() == [0, 1]
    with pytest.raises(ValueError, match="policy"):
        apply_outlier_policy(lab, "merge")
    with pytest.raises(ValueError, match="1-D integer"):
        cluster_stats(np.array([0.5, 1.0]))


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, 32)) * 3
    ids = np.repeat(np.arange(6), 20)
    x = (centers[ids] + rng.standard_normal((120, 32))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), ids


def test_kmeans_seeded_and_recovers_blobs():
    x, ids = _blobs()
    a = pseudo_labels(x, "kmeans", num_clusters=6, seed=3, kmeans_batch_size=50, kmeans_init_size=60)
    b = pseudo_labels(x, "kmeans", num_clusters=6, seed=3, kmeans_batch_size=50, kmeans_init_size=60)
    assert np.array_equal(a, b) and a.dtype == np.int64 and a.min() >= 0
    assert adjusted_rand_score(ids, a) > 0.95
    with pytest.raises(ValueError, match="num_clusters"):
        pseudo_labels(x, "kmeans")
    with pytest.raises(ValueError, match="exceeds"):
        pseudo_labels(x, "kmeans", num_clusters=500)
    with pytest.raises(ValueError, match="unknown method"):
        pseudo_labels(x, "spectral")


def test_dbscan_recovers_blobs():
    x, ids = _blobs(1)
    lab = pseudo_labels(x, "dbscan", k1=20, k2=6)
    assert adjusted_rand_score(ids[lab >= 0], lab[lab >= 0]) > 0.95 and np.mean(lab >= 0) > 0.9


# ------------------------------------------------------------------------------------------ k1=auto
def _id_blobs(n_ids, per, seed=0, dim=32, spread=0.35):
    """n_ids identities x per images each: unit centre + isotropic noise (norm ~spread)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n_ids, dim))
    ids = np.repeat(np.arange(n_ids), per)
    x = c[ids] / np.linalg.norm(c[ids], axis=1, keepdims=True) + spread * rng.standard_normal((len(ids), dim)) / np.sqrt(dim)
    return x.astype(np.float32), ids


def _brute_silhouette_all(x, labels):
    """Silhouette by its definition (cosine distance), mean over ALL images, an outlier counting 0."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - xn @ xn.T
    total = 0.0
    for i, li in enumerate(labels):
        if li < 0:
            continue
        own = [j for j in range(len(labels)) if labels[j] == li and j != i]
        if not own:
            continue  # a singleton cluster: silhouette 0
        a = np.mean([d[i, j] for j in own])
        b = min(np.mean([d[i, j] for j in range(len(labels)) if labels[j] == lk])
                for lk in set(labels.tolist()) - {li, -1})
        total += (b - a) / max(a, b)
    return total / len(labels)


def test_clustering_silhouette_against_its_definition():
    from lf2core.cluster.labels import clustering_silhouette

    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    lab = rng.integers(-1, 4, size=40)
    assert clustering_silhouette(x, lab) == pytest.approx(_brute_silhouette_all(x, lab), abs=1e-6)
    assert clustering_silhouette(x, np.full(40, -1)) == 0.0 and clustering_silhouette(x, np.zeros(40, int)) == 0.0
    # a sample: the same value as the definition on the same seeded subset
    sub = np.sort(np.random.default_rng(7).choice(40, size=25, replace=False))
    assert clustering_silhouette(x, lab, sample=25, seed=7) == pytest.approx(
        _brute_silhouette_all(x[sub], lab[sub]), abs=1e-6)


def test_auto_k1_follows_the_neighbourhood_size_without_labels():
    """Identities of 6 vs 32 images: k1=auto keeps a small k1 for the small ones and a large one for the
    large ones, each recovering the identities; the chosen k1 is the argmax of the reported silhouettes,
    each equal to the silhouette of the fixed-k1 clustering recomputed here."""
    from lf2core.cluster.labels import clustering_silhouette

    chosen_k1 = {}
    for per, n_ids in ((6, 60), (32, 15)):
        x, ids = _id_blobs(n_ids, per)
        chosen = {}
        lab = pseudo_labels(x, "dbscan", k1="auto", k2=6, eps="auto", min_samples=4, chosen=chosen)
        scores = chosen["k1_silhouette"]
        assert sorted(scores) == [10, 15, 20, 25, 30, 40]
        for k1, score in scores.items():
            fixed = pseudo_labels(x, "dbscan", k1=k1, k2=6, eps="auto", min_samples=4)
            assert score == pytest.approx(clustering_silhouette(x / np.linalg.norm(x, axis=1, keepdims=True), fixed),
                                          abs=1e-5)
        k1 = chosen["k1"]
        assert scores[k1] == max(scores.values()) and k1 == min(k for k, v in scores.items() if v == scores[k1])
        assert np.array_equal(lab, pseudo_labels(x, "dbscan", k1=k1, k2=6, eps="auto", min_samples=4))
        assert adjusted_rand_score(ids, lab) == pytest.approx(1.0)
        chosen_k1[per] = k1
    assert chosen_k1[6] < chosen_k1[32]
    with pytest.raises(ValueError, match="k1 must be"):
        pseudo_labels(x, "dbscan", k1="many")
