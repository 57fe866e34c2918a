"""lf2core.plots: valid PNGs of the expected size, hit/miss colouring against a brute-force ranking."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from lf2core import plots
from lf2core.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_images(tmp_path, n, prefix):
    paths = []
    rng = np.random.default_rng(len(prefix) + n)
    for i in range(n):
        p = tmp_path / f"{prefix}_{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def problem(seed=0, nq=12, ng=40):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, 6, nq)
    g_pids = rng.integers(0, 6, ng)
    q_cams = rng.integers(0, 3, nq)
    g_cams = rng.integers(0, 3, ng)
    d = np.round(rng.random((nq, ng)) * 4) / 4  # ties included
    return d, q_pids, g_pids, q_cams, g_cams


def brute_topk(d, qp, gp, qc, gc, i, k):
    order = sorted(range(len(gp)), key=lambda j: (d[i, j], j))
    kept = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i])]
    return [bool(gp[j] == qp[i]) for j in kept[:k]]


def test_ranklist_png_is_a_png_of_expected_size(tmp_path):
    d, qp, gp, qc, gc = problem()
    qpaths, gpaths = make_images(tmp_path, len(qp), "q"), make_images(tmp_path, len(gp), "g")
    out = tmp_path / "sub" / "ranklist.png"
    ret = plots.ranklist_png(str(out), qpaths, gpaths, d, qp, gp, qc, gc, num_queries=2, topk=10)
    assert ret == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as im:
        w, h = im.size
    # 11 columns of ~0.95 in and 2 rows of ~2 in at 100 dpi
    assert 950 <= w <= 1200 and 400 <= h <= 600
    assert not list(out.parent.glob(".*tmp"))  # atomic write left no temp file
    out2 = tmp_path / "r2.png"
    plots.ranklist_png(str(out2), qpaths, gpaths, d, qp, gp, qc, gc, num_queries=4, topk=10)
    with Image.open(out2) as im:
        assert im.size[0] == w and im.size[1] > h + 350


def test_ranklist_marks_hits_like_brute_force(tmp_path):
    d, qp, gp, qc, gc = problem(3)
    qpaths, gpaths = make_images(tmp_path, len(qp), "q"), make_images(tmp_path, len(gp), "g")
    topk = 6
    fig = plots.ranklist_figure(qpaths, gpaths, d, qp, gp, qc, gc, num_queries=5, topk=topk, seed=1)
    sel = plots.select_queries(qp, gp, qc, gc, 5, 1)
    axes = fig.axes
    assert len(axes) == len(sel) * (topk + 1)
    n_hit = n_miss = 0
    for r, qi in enumerate(sel):
        expected = brute_topk(d, qp, gp, qc, gc, qi, topk)
        cells = axes[r * (topk + 1) + 1 : (r + 1) * (topk + 1)]
        for k, ax in enumerate(cells):
            color = to_hex(ax.spines["left"].get_edgecolor())
            if k >= len(expected):
                assert not ax.axison
                continue
            want = plots.HIT_COLOR if expected[k] else plots.MISS_COLOR
            assert color == want, (qi, k)
            n_hit += expected[k]
            n_miss += not expected[k]
    assert n_hit > 0 and n_miss > 0


def test_select_queries_only_valid_and_seeded():
    qp = np.array([1, 2, 3, 4, 5, 6])
    qc = np.array([0, 0, 0, 0, 0, 0])
    gp = np.array([1, 2, 3, 4, 9])
    gc = np.array([1, 0, 2, 0, 1])  # pids 2, 4: same camera only; 5, 6 absent
    for seed in range(5):
        sel = plots.select_queries(qp, gp, qc, gc, 10, seed)
        assert sorted(sel.tolist()) == [0, 2]
    picks = {tuple(plots.select_queries(np.arange(50), np.arange(50), np.zeros(50), np.ones(50), 3, s))
             for s in range(4)}
    assert len(picks) > 1
    assert plots.select_queries(np.arange(50), np.arange(50), np.zeros(50), np.ones(50), 3, 7).tolist() == \
        plots.select_queries(np.arange(50), np.arange(50), np.zeros(50), np.ones(50), 3, 7).tolist()


def test_ranklist_errors(tmp_path):
    d, qp, gp, qc, gc = problem()
    qpaths, gpaths = make_images(tmp_path, len(qp), "q"), make_images(tmp_path, len(gp), "g")
    gpaths_bad = [str(tmp_path / "missing.jpg")] * len(gpaths)
    with pytest.raises(DataError, match="missing.jpg"):
        plots.ranklist_png(str(tmp_path / "x.png"), qpaths, gpaths_bad, d, qp, gp, qc, gc)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="paths"):
        plots.ranklist_png(str(tmp_path / "x.png"), qpaths[:-1], gpaths, d, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="distmat"):
        plots.ranklist_png(str(tmp_path / "x.png"), qpaths, gpaths, d[:, :-1], qp, gp, qc, gc)


def stats_rounds(n=4):
    out = []
    for r in range(n):
        st = {"round": r}
        for s, base in (("global", 100), ("upper", 80), ("lower", 90)):
            st[s] = {"num_clusters": base + r, "outlier_ratio": 0.3 - 0.05 * r, "nmi": 0.5 + 0.1 * r,
                     "ari": 0.2 + 0.1 * r, "size_hist": [[2, 10 + r], [3, 5], [7, 1]]}
        out.append(st)
    return out


def test_cluster_stats_png(tmp_path):
    out = tmp_path / "stats.png"
    assert plots.cluster_stats_png(str(out), stats_rounds()) == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as im:
        w, h = im.size
    assert 1000 <= w <= 1300 and 600 <= h <= 750


def test_cluster_stats_figure_lines_follow_available_keys():
    stats = stats_rounds(5)
    del stats[2]["lower"]["ari"]  # one missing point
    for st in stats:
        del st["upper"]  # one label set missing entirely
        st["global"]["pairwise_precision"] = 0.9
    fig = plots.cluster_stats_figure(stats)
    clusters, outliers, nmi_ari, pairwise, hist = fig.axes
    assert len(clusters.lines) == 2 and len(outliers.lines) == 2
    assert len(nmi_ari.lines) == 4
    by_label = {ln.get_label(): ln for ln in nmi_ari.lines}
    assert list(by_label["lower ari"].get_xdata()) == [0, 1, 3, 4]
    assert list(by_label["global nmi"].get_ydata()) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [ln.get_label() for ln in pairwise.lines] == ["global pairwise_precision"]
    # histogram of the last round: 3 bars per label set, heights = counts
    heights = sorted(p.get_height() for p in hist.patches)
    assert heights == sorted([14, 5, 1] * 2)


def test_cluster_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plots.cluster_stats_png(str(tmp_path / "s.png"), [])
    with pytest.raises(ValueError, match="label set"):
        plots.cluster_stats_png(str(tmp_path / "s.png"), [{"round": 0}])
    # a single round with only the cluster count still renders
    plots.cluster_stats_png(str(tmp_path / "s.png"), [{"round": 0, "global": {"num_clusters": 3}}])
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
