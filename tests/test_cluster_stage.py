"""Stage cluster and `lf2 cluster` on a small synthetic features.npz."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lf2core.cli import main
from lf2core.cluster import pseudo_labels
from lf2core.config import load_config
from lf2core.data.datasets import UNLABELLED
from lf2core.errors import DataError
from lf2core.stages.cluster import cluster


def _write_features(path, n_ids=12, per=10, seed=0):
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(n_ids), per)
    camids = rng.integers(0, 3, size=len(pids))
    arrays = {}
    for k, name in enumerate(("global", "upper", "lower")):
        c = rng.standard_normal((n_ids, 24)) * 2.5
        x = c[pids] + rng.standard_normal((len(pids), 24)) * (1.0 + 0.3 * k)
        arrays[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "features.npz", pids=pids.astype(np.int64), camids=camids.astype(np.int64), **arrays)
    return arrays, pids


@pytest.mark.parametrize("method", ["dbscan", "kmeans"])
def test_stage_writes_labels_stats_png(tmp_path, method):
    arrays, pids = _write_features(tmp_path / "feat")
    cfg = load_config(None, [f"cluster.method={method}", "cluster.num_clusters=12", "cluster.k1=15",
                             "cluster.kmeans_init_size=60", "cluster.kmeans_batch_size=40"])
    metrics = cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out"), round_index=2)
    out = tmp_path / "out"
    assert (out / "_COMPLETE").exists() and (out / "cluster_stats.png").stat().st_size > 1000
    with np.load(out / "labels.npz") as z:
        labels = {k: z[k] for k in z.files}
    assert set(labels) == {"global", "upper", "lower", "centroids"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["round"] == 2
    for name in ("global", "upper", "lower"):
        lab = labels[name]
        assert lab.dtype == np.int64 and lab.shape == pids.shape
        if method == "dbscan":  # the stage labels are exactly the library's
            assert np.array_equal(lab, pseudo_labels(arrays[name], "dbscan", k1=15, k2=6, eps=0.6, min_samples=4))
        else:
            assert lab.min() == 0 and lab.max() == 11
        assert stats[name]["num_clusters"] == len(set(lab[lab >= 0].tolist()))
        assert metrics[f"{name}/num_clusters"] == stats[name]["num_clusters"]
        assert 0 <= metrics[f"{name}/nmi"] <= 1 and "nmi_camera" in stats[name]
        assert not any(isinstance(v, (list, dict)) for v in metrics.values())
    assert stats["global"]["nmi"] > 0.9


@pytest.mark.parametrize("unknown", ["all_minus_one", "some_unlabelled"])
def test_unknown_ids_give_no_supervised_stats(tmp_path, unknown):
    _write_features(tmp_path / "feat")
    with np.load(tmp_path / "feat" / "features.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if unknown == "all_minus_one":
        arrays["pids"][:] = -1
    else:  # a target train split mixing identity folders and unlabelled images (datasets.UNLABELLED)
        arrays["pids"][::3] = UNLABELLED
    np.savez(tmp_path / "feat" / "features.npz", **arrays)
    cfg = load_config(None, ["cluster.method=dbscan", "cluster.k1=15"])
    metrics = cluster(cfg, str(tmp_path / "feat" / "features.npz"), str(tmp_path / "out"))
    assert "global/nmi" not in metrics and "global/nmi_camera" in metrics
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    for name in ("global", "upper", "lower"):  # no identity-based statistic from partly unknown pids
        assert not {"nmi", "ari", "pairwise_precision", "pairwise_recall"} & set(stats[name])
        assert stats[name]["num_samples"] == 120


def test_ground_truth_labels_are_the_true_ids(tmp_path):
    _write_features(tmp_path / "feat")
    with np.load(tmp_path / "feat" / "features.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pids"] = np.array([7, 3, 3, 42] * 30, dtype=np.int64)  # gaps and order: renumbered by value
    np.savez(tmp_path / "feat" / "features.npz", **arrays)
    cfg = load_config(None, ["cluster.method=ground_truth"])
    metrics = cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out"))
    with np.load(tmp_path / "out" / "labels.npz") as z:
        for name in ("global", "upper", "lower"):
            assert z[name].tolist() == [1, 0, 0, 2] * 30
    assert metrics["global/num_clusters"] == 3 and metrics["global/nmi"] == pytest.approx(1.0)
    arrays["pids"][5] = UNLABELLED  # needs every identity
    np.savez(tmp_path / "feat" / "features.npz", **arrays)
    with pytest.raises(DataError, match="ground_truth needs an identity for every target train image"):
        cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out2"))


def test_bad_features_raise_data_error(tmp_path):
    cfg = load_config(None, ["cluster.method=dbscan"])
    with pytest.raises(DataError, match="features.npz"):
        cluster(cfg, str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "f").mkdir()
    np.savez(tmp_path / "f" / "features.npz", global_=np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="missing array 'global'"):
        cluster(cfg, str(tmp_path / "f"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_cluster(tmp_path, capsys):
    _write_features(tmp_path / "feat")
    rc = main(["cluster", "--features", str(tmp_path / "feat"), "--out", str(tmp_path / "out"), "--round", "1",
               "--set", "cluster.method=dbscan", "--set", "cluster.k1=15"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["global/num_clusters"] >= 5
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["round"] == 1
    rc = main(["cluster", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert rc == 2


def test_stage_eps_auto_chooses_eps_per_set_and_logs_it(tmp_path):
    """eps=auto: each set's eps is the rule's value on that set's own distances (rho_eps on the full
    sparse matrix, computed here independently), reported per set, and the labels are DBSCAN's with it."""
    from lf2core.cluster import jaccard_distance
    from lf2core.cluster.labels import rho_eps

    arrays, _ = _write_features(tmp_path / "feat")
    cfg = load_config(None, ["cluster.method=dbscan", "cluster.k1=15", "cluster.eps=auto", "cluster.eps_rho=0.01"])
    metrics = cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out"), round_index=0)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    with np.load(tmp_path / "out" / "labels.npz") as z:
        labels = {k: z[k] for k in z.files}
    for name in ("global", "upper", "lower"):
        want = rho_eps(jaccard_distance(arrays[name], k1=15, k2=6), 0.01)
        assert stats[name]["eps"] == pytest.approx(want, abs=1e-6) and metrics[f"{name}/eps"] == stats[name]["eps"]
        assert np.array_equal(labels[name], pseudo_labels(arrays[name], "dbscan", k1=15, k2=6, eps=want,
                                                          min_samples=4))
    assert len({stats[n]["eps"] for n in ("global", "upper", "lower")}) == 3  # chosen per set
    from lf2core.tracking import catalog  # what the run logs per round (no mlflow needed for the mapping)

    logged = catalog.cluster_round(stats)
    assert logged["round/cluster/upper/eps"] == pytest.approx(stats["upper"]["eps"], rel=1e-3)
    assert logged["round/cluster/global/eps_pairs_per_image"] == pytest.approx(0.01 * (len(labels["global"]) - 1),
                                                                               rel=1e-3)


def test_camera_normalised_by_hand():
    from lf2core.stages.cluster import camera_normalised

    x = np.array([[1.0, 2.0], [3.0, 2.0], [0.0, 5.0], [7.0, 1.0]], dtype=np.float32)
    cams = np.array([0, 0, 1, 2])  # camera 1 and 2 hold one image each: left as they are
    got = camera_normalised(x, cams, "center")
    want = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [7.0, 1.0] / np.hypot(7.0, 1.0)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    x2 = np.array([[1.0, 0.0], [3.0, 4.0], [5.0, 2.0], [7.0, 6.0]], dtype=np.float32)
    got = camera_normalised(x2, np.array([0, 0, 1, 1]), "standardise")  # each dim: (v - mean) / std = +-1
    np.testing.assert_allclose(got, np.array([[-1, -1], [1, 1], [-1, -1], [1, 1]]) / np.sqrt(2), atol=1e-6)


def test_camera_norm_removes_a_camera_offset_that_clustering_would_follow(tmp_path):
    """Identities seen by 3 cameras each, camera offsets larger than the identity spread: raw features cluster
    by camera; centred per camera they cluster by identity (NMI with identity / with camera, measured)."""
    rng = np.random.default_rng(4)
    n_ids, per_cam, cams_n = 12, 4, 3
    pids = np.repeat(np.arange(n_ids), per_cam * cams_n)
    camids = np.tile(np.repeat(np.arange(cams_n), per_cam), n_ids)
    ident = rng.standard_normal((n_ids, 32))
    offset = rng.standard_normal((cams_n, 32)) * 3.0
    arrays = {}
    for name in ("global", "upper", "lower"):
        x = ident[pids] + offset[camids] + 0.3 * rng.standard_normal((len(pids), 32))
        arrays[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    (tmp_path / "feat").mkdir()
    np.savez(tmp_path / "feat" / "features.npz", pids=pids.astype(np.int64), camids=camids.astype(np.int64),
             **arrays)
    nmi = {}
    for how in ("none", "center", "standardise"):
        cfg = load_config(None, ["cluster.method=kmeans", f"cluster.num_clusters={n_ids}", f"cluster.camera_norm={how}",
                                 "cluster.kmeans_init_size=100", "cluster.kmeans_batch_size=100", "cluster.kmeans_n_init=3"])
        cluster(cfg, str(tmp_path / "feat"), str(tmp_path / how), round_index=0)
        s = json.loads((tmp_path / how / "stats.json").read_text())["global"]
        nmi[how] = (s["nmi"], s["nmi_camera"])
    assert nmi["none"][0] < 0.6 and nmi["none"][1] > 0.5  # raw: the cameras dominate
    for how in ("center", "standardise"):
        assert nmi[how][0] > 0.9 and nmi[how][1] < 0.1, nmi


def test_camera_norm_needs_cameras(tmp_path):
    _write_features(tmp_path / "feat")
    with np.load(tmp_path / "feat" / "features.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["camids"][:] = -1
    np.savez(tmp_path / "feat" / "features.npz", **arrays)
    cfg = load_config(None, ["cluster.method=dbscan", "cluster.camera_norm=center"])
    with pytest.raises(DataError, match="cluster.camera_norm"):
        cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_stage_k1_auto_chooses_k1_per_set_and_logs_it(tmp_path):
    """k1=auto: each set's k1 is the argmax of its own silhouettes (reported per set), the labels are DBSCAN's
    with that k1, and the round's metrics carry the k1 used; a word other than auto is refused by the config."""
    from lf2core.config import ConfigError

    arrays, _ = _write_features(tmp_path / "feat")
    cfg = load_config(None, ["cluster.method=dbscan", "cluster.k1=auto", "cluster.eps=auto"])
    metrics = cluster(cfg, str(tmp_path / "feat"), str(tmp_path / "out"), round_index=0)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    with np.load(tmp_path / "out" / "labels.npz") as z:
        labels = {k: z[k] for k in z.files}
    for name in ("global", "upper", "lower"):
        scores = stats[name]["k1_silhouette"]
        k1 = stats[name]["k1"]
        assert scores[str(k1)] == max(scores.values()) and metrics[f"{name}/k1"] == k1
        assert np.array_equal(labels[name], pseudo_labels(arrays[name], "dbscan", k1=k1, k2=6, eps="auto",
                                                          min_samples=4))
    from lf2core.tracking import catalog

    assert catalog.cluster_round(stats)["round/cluster/global/k1"] == stats["global"]["k1"]
    with pytest.raises(ConfigError, match="cluster.k1"):
        load_config(None, ["cluster.k1=many"])
    assert load_config(None, ["cluster.k1=20"]).cluster.k1 == 20
