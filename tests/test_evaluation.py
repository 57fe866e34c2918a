"""lf2core.evaluation against independent references.

References written here: a plain-loop per-query evaluator (tie rule: distance, then gallery index),
sklearn's average_precision_score, hand-computed tiny cases, a brute-force pairwise distance and a dense
numpy k-reciprocal re-ranking written from the semantics in docs/method.md (section 5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from lf2core import evaluation as ev
from lf2core.errors import Lf2Error
from lf2core.evaluation import ranking


# ----------------------------------------------------------------------------- brute-force reference
def brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Plain per-query loops; ranking by (distance, gallery index)."""
    nq, ng = len(q_pids), len(g_pids)
    aps, inps, cmcs = [], [], []
    for i in range(nq):
        order = sorted(range(ng), key=lambda j: (float(distmat[i][j]), j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        flags = [1 if g_pids[j] == q_pids[i] else 0 for j in kept]
        if sum(flags) == 0:
            continue
        hits, precs, last = 0, [], None
        for r, f in enumerate(flags, start=1):
            if f:
                hits += 1
                precs.append(hits / r)
                last = r
        aps.append(sum(precs) / len(precs))
        inps.append(hits / last)
        first = flags.index(1)
        cmcs.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
    if not aps:
        return None
    cmc = [sum(c[k] for c in cmcs) / len(cmcs) for k in range(max_rank)]
    return {"mAP": sum(aps) / len(aps), "mINP": sum(inps) / len(inps), "cmc": np.array(cmc), "n": len(aps)}


def sklearn_map(distmat, q_pids, g_pids, q_camids, g_camids):
    aps = []
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_camids == q_camids[i]))
        y = (g_pids[keep] == q_pids[i]).astype(int)
        if y.sum() == 0:
            continue
        aps.append(average_precision_score(y, -distmat[i][keep]))
    return float(np.mean(aps))


def random_problem(seed, nq=30, ng=150, n_ids=12, n_cams=4, distractor_frac=0.2, dtype=np.float64):
    """Random pids/cams: distractors (pid 0) in the gallery, some query ids absent from the gallery,
    many same-camera matches (few cameras)."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, n_ids + 3, nq)  # ids n_ids+1, n_ids+2 never in the gallery
    g_pids = rng.integers(1, n_ids + 1, ng)
    g_pids[rng.random(ng) < distractor_frac] = 0
    q_camids = rng.integers(0, n_cams, nq)
    g_camids = rng.integers(0, n_cams, ng)
    distmat = rng.normal(size=(nq, ng)).astype(dtype)
    return distmat, q_pids, g_pids, q_camids, g_camids


def assert_same(res, ref, tol=1e-12):
    assert ref is not None
    assert res["num_valid_queries"] == ref["n"]
    assert abs(res["mAP"] - ref["mAP"]) < tol
    assert abs(res["mINP"] - ref["mINP"]) < tol
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=tol, rtol=0)


# ------------------------------------------------------------------------------------- evaluate_rank
@pytest.mark.parametrize("seed", range(6))
def test_random_problems_match_brute_force_and_sklearn(seed):
    args = random_problem(seed, dtype=np.float32 if seed % 2 else np.float64)
    distmat, q_pids, g_pids, q_camids, g_camids = args
    res = ev.evaluate_rank(*args, max_rank=20)
    ref = brute_force(*args, max_rank=20)
    assert_same(res, ref)
    # the problem really has the situations under test
    skipped = len(q_pids) - ref["n"]
    assert skipped > 0
    assert any(((g_pids == p) & (g_camids == c)).any() for p, c in zip(q_pids, q_camids))
    assert (g_pids == 0).any()
    # no ties in continuous random distances -> sklearn's AP agrees
    assert abs(res["mAP"] - sklearn_map(*args)) < 1e-9


def test_chunking_and_input_types_do_not_change_results():
    args = random_problem(11, nq=23, ng=97, dtype=np.float32)
    base = ev.evaluate_rank(*args)
    for chunk in (1, 5, 23, 1000):
        assert_same(ev.evaluate_rank(*args, chunk_size=chunk), {**base, "n": base["num_valid_queries"]})
    torch_args = [torch.from_numpy(np.asarray(a)) for a in args]
    assert_same(ev.evaluate_rank(*torch_args), {**base, "n": base["num_valid_queries"]})
    # float64 distmat holding the same values goes through the torch.sort path
    f64 = (args[0].astype(np.float64),) + tuple(args[1:])
    assert_same(ev.evaluate_rank(*f64), {**base, "n": base["num_valid_queries"]})
    # float ids holding integers are accepted
    fl = (args[0], args[1].astype(float), args[2].astype(float)) + tuple(args[3:])
    assert_same(ev.evaluate_rank(*fl), {**base, "n": base["num_valid_queries"]})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_are_broken_by_gallery_index(dtype):
    # quantised distances: lots of ties between matches and non-matches
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(3, nq=25, ng=80, dtype=dtype)
    distmat = np.round(distmat).astype(dtype)  # values in {-3..3}
    res = ev.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10)
    assert_same(res, brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10))
    # and the rule matters here: ranking by (distance, -index) gives a different mAP
    rev = distmat[:, ::-1]
    flipped = brute_force(rev, q_pids, g_pids[::-1], q_camids, g_camids[::-1], max_rank=10)
    assert abs(flipped["mAP"] - res["mAP"]) > 1e-6


@pytest.mark.parametrize("force_sort", [False, True])
def test_both_ranking_paths_match_brute_force_on_float32_ties(monkeypatch, force_sort):
    # float32 normally takes the searchsorted path; ranking._FORCE_SORT makes it sort whole rows instead
    monkeypatch.setattr(ranking, "_FORCE_SORT", force_sort)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(8, nq=31, ng=90, dtype=np.float32)
    distmat = np.round(distmat * 1.5).astype(np.float32)
    distmat[:, ::7] = -0.0  # -0.0 ties with 0.0
    for chunk in (None, 4):
        res = ev.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=15, chunk_size=chunk)
        assert_same(res, brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=15))


def test_tie_rule_hand_case():
    pids = np.array([1])
    cams = np.array([0])
    # non-match (index 0) and match (index 1) at the same distance: the non-match ranks first
    r = ev.evaluate_rank(np.array([[1.0, 1.0]], dtype=np.float32), pids, np.array([2, 1]), cams, np.array([1, 1]))
    assert r["mAP"] == pytest.approx(0.5) and r["cmc"][0] == 0.0 and r["cmc"][1] == 1.0
    assert r["mINP"] == pytest.approx(0.5)
    # swapped gallery order: the match ranks first
    r = ev.evaluate_rank(np.array([[1.0, 1.0]], dtype=np.float32), pids, np.array([1, 2]), cams, np.array([1, 1]))
    assert r["mAP"] == pytest.approx(1.0) and r["cmc"][0] == 1.0
    # -0.0 and +0.0 are equal distances: index order again
    r = ev.evaluate_rank(np.array([[0.0, -0.0]], dtype=np.float32), pids, np.array([2, 1]), cams, np.array([1, 1]))
    assert r["mAP"] == pytest.approx(0.5)


def test_hand_computed_one_query_five_gallery():
    # query pid 1, camera 0
    # g0 d=.1 pid1 cam1 match | g1 d=.2 pid1 cam0 dropped | g2 d=.3 pid2 | g3 d=.4 pid1 cam2 match | g4 d=.5 pid0
    d = np.array([[0.4, 0.2, 0.3, 0.1, 0.5]])[:, [3, 1, 2, 0, 4]]  # = [.1, .2, .3, .4, .5]
    g_pids = np.array([1, 1, 2, 1, 0])
    g_cams = np.array([1, 0, 1, 2, 1])
    r = ev.evaluate_rank(d, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=6)
    # kept ranking: g0 (match, rank 1), g2 (rank 2), g3 (match, rank 3), g4
    assert r["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert r["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(r["cmc"], [1, 1, 1, 1, 1, 1])  # beyond 4 kept entries: still 1
    assert len(r["cmc"]) == 6

    # reversed distances: kept ranking g4, g3 (match, rank 2), g2, g0 (match, rank 4)
    r = ev.evaluate_rank(1 - d, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=5)
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1])


def test_two_queries_one_without_valid_match_is_skipped():
    d = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    g_pids = np.array([5, 7, 7])
    g_cams = np.array([0, 1, 2])
    # query 0: pid 5 cam 0 -> its only match g0 has the same camera -> skipped
    # query 1: pid 7 cam 0 -> matches g2 (rank 1) and g1 (rank 2): AP 1
    r = ev.evaluate_rank(d, np.array([5, 7]), g_pids, np.array([0, 0]), g_cams, max_rank=3)
    assert r["num_valid_queries"] == 1
    assert r["mAP"] == pytest.approx(1.0) and r["mINP"] == pytest.approx(1.0)


def test_no_valid_query_raises_clear_error():
    with pytest.raises(ValueError, match="no query has a valid match"):
        ev.evaluate_rank(np.zeros((2, 3)), np.array([1, 2]), np.array([1, 2, 0]), np.array([0, 1]),
                         np.array([0, 1, 2]))
    with pytest.raises(Lf2Error):
        ev.evaluate_rank(np.zeros((1, 2)), np.array([9]), np.array([1, 2]), np.array([0]), np.array([0, 1]))


def test_bad_inputs_raise():
    d = np.zeros((2, 3))
    ids2, ids3 = np.array([1, 2]), np.array([1, 2, 3])
    with pytest.raises(ValueError, match="g_pids"):
        ev.evaluate_rank(d, ids2, ids2, ids2, ids3)
    with pytest.raises(ValueError, match="2-D"):
        ev.evaluate_rank(np.zeros(3), ids2, ids3, ids2, ids3)
    with pytest.raises(ValueError, match="NaN"):
        ev.evaluate_rank(np.full((2, 3), np.nan), ids2, ids3, ids2, ids3)
    with pytest.raises(ValueError, match="integer"):
        ev.evaluate_rank(d, np.array([1.5, 2.0]), ids3, ids2, ids3)
    with pytest.raises(ValueError, match="max_rank"):
        ev.evaluate_rank(d, ids2, ids3, ids2, ids3, max_rank=0)


def test_infinite_distances_rank_last():
    d = np.array([[np.inf, 0.5, 0.2]], dtype=np.float32)
    r = ev.evaluate_rank(d, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]))
    assert r["mAP"] == pytest.approx(1 / 3)
    d = np.array([[-np.inf, 0.5, 0.2]], dtype=np.float32)
    r = ev.evaluate_rank(d, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]))
    assert r["mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- valid_topk
def test_valid_topk_matches_brute_force():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(5, nq=20, ng=40, dtype=np.float32)
    distmat = np.round(distmat * 2).astype(np.float32)  # ties too
    g_pids[:30] = q_pids[0]  # query 0 keeps fewer entries than usual
    g_camids[:30] = q_camids[0]
    idx, hits = ev.valid_topk(distmat, q_pids, g_pids, q_camids, g_camids, topk=12)
    assert idx.shape == hits.shape == (20, 12)
    for i in range(20):
        order = sorted(range(40), key=lambda j: (float(distmat[i, j]), j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])][:12]
        exp_idx = kept + [-1] * (12 - len(kept))
        exp_hit = [bool(g_pids[j] == q_pids[i]) for j in kept] + [False] * (12 - len(kept))
        assert idx[i].tolist() == exp_idx
        assert hits[i].tolist() == exp_hit
    assert (idx[0] == -1).any()  # padding exercised


# -------------------------------------------------------------------------------- pairwise_distance
def test_pairwise_distance_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(13, 7))
    g = rng.normal(size=(29, 7))
    ref = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(ev.pairwise_distance(q, g, chunk_size=4), ref, rtol=1e-10, atol=1e-10)
    out32 = ev.pairwise_distance(torch.from_numpy(q).float(), g.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=1e-4, atol=1e-4)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(ev.pairwise_distance(qn, gn), 2 - 2 * qn @ gn.T, atol=1e-12)
    assert (ev.pairwise_distance(qn, qn) >= 0).all()
    with pytest.raises(ValueError, match="dimensions"):
        ev.pairwise_distance(q, g[:, :3])


# ------------------------------------------------------------------------------------------- rerank
def dense_jaccard(x, k1, k2):
    """Dense reference of docs/method.md's k-reciprocal Jaccard distance (x: [N, d], unit rows)."""
    n = len(x)
    sim = x @ x.T
    rank = np.argsort(-sim, axis=1, kind="stable")
    for i in range(n):  # i itself first
        rank[i] = np.concatenate([[i], rank[i][rank[i] != i]])
    rank = rank[:, :k1]

    def recip(i, k):
        fwd = rank[i, : k + 1]
        return [j for j in fwd if i in rank[j, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r_i = recip(i, k1)
        e = set(r_i)
        for c in r_i:
            rc = recip(c, int(round(k1 / 2)))
            if len(set(rc) & set(r_i)) > 2 / 3 * len(rc):
                e |= set(rc)
        e = sorted(e)
        w = np.exp(-(2 - 2 * sim[i, e]))
        v[i, e] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            m = np.minimum(v[i], v[j]).sum()
            jac[i, j] = max(0.0, 1 - m / (2 - m))
    return jac


def dense_rerank(q, g, k1, k2, lam):
    x = np.concatenate([q, g]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nq = len(q)
    jac = dense_jaccard(x, k1, k2)
    d = ((x[:nq, None, :] - x[None, :, :]) ** 2).sum(-1)  # [Q, N]
    orig = d / d.max(axis=1, keepdims=True)
    return (1 - lam) * jac[:nq, nq:] + lam * orig[:, nq:]


def clustered_features(seed, n_ids=12, per_id=8, dim=16, noise=0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    pids = np.repeat(np.arange(1, n_ids + 1), per_id)
    feats = centres[pids - 1] + noise * rng.normal(size=(len(pids), dim))
    cams = np.tile(np.arange(per_id) % 4, n_ids)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    is_q = np.tile(np.arange(per_id) < 2, n_ids)  # 2 queries per id, the rest gallery
    return feats[is_q], feats[~is_q], pids[is_q], pids[~is_q], cams[is_q], cams[~is_q]


def test_rerank_matches_dense_reference():
    qf, gf, *_ = clustered_features(0, n_ids=6, per_id=7, dim=8, noise=0.7)
    out = ev.rerank(qf, gf, k1=8, k2=3, lambda_value=0.3)
    ref = dense_rerank(qf, gf, 8, 3, 0.3)
    assert out.shape == (len(qf), len(gf))
    np.testing.assert_allclose(out, ref, atol=2e-5)
    jac = dense_rerank(qf, gf, 8, 3, 0.0)  # the Jaccard term alone: non-trivial (some pairs share V columns)
    assert 0.05 < (jac < 1).mean() < 0.95
    # lambda = 1 is the normalised original distance; k2 = 1 (no query expansion) also agrees
    np.testing.assert_allclose(ev.rerank(qf, gf, k1=8, k2=1, lambda_value=1.0),
                               dense_rerank(qf, gf, 8, 1, 1.0), atol=2e-5)
    np.testing.assert_allclose(ev.rerank(torch.from_numpy(qf), gf, k1=6, k2=1, lambda_value=0.0),
                               dense_rerank(qf, gf, 6, 1, 0.0), atol=2e-5)
    # unnormalised input features are L2-normalised first
    np.testing.assert_allclose(ev.rerank(3.0 * qf, gf, k1=8, k2=3), out, atol=1e-6)


def test_rerank_improves_map_on_clustered_problem():
    qf, gf, qp, gp, qc, gc = clustered_features(1, n_ids=20, per_id=10, dim=16, noise=0.9)
    plain = ev.evaluate_features(qf, gf, qp, gp, qc, gc, rerank=False)
    rr = ev.evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True, k1=12, k2=4)
    assert 0.2 < plain["mAP"] < 0.9  # not trivially easy
    assert rr["mAP"] > plain["mAP"] + 0.03, (plain["mAP"], rr["mAP"])


def test_rerank_bad_arguments():
    qf, gf, *_ = clustered_features(0, n_ids=3, per_id=4)
    with pytest.raises(ValueError, match="lambda_value"):
        ev.rerank(qf, gf, lambda_value=1.5)
    with pytest.raises(ValueError, match="k1"):
        ev.rerank(qf, gf, k1=len(qf) + len(gf))


# -------------------------------------------------------------------------------- evaluate_features
def test_evaluate_features_consistent_with_evaluate_rank():
    qf, gf, qp, gp, qc, gc = clustered_features(2)
    out = ev.evaluate_features(qf, gf, qp, gp, qc, gc)
    d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    ref = brute_force(d, qp, gp, qc, gc, max_rank=10)
    np.testing.assert_allclose(out["distmat"], d, atol=1e-9)
    assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert out["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)
    assert [out["R1"], out["R5"], out["R10"]] == pytest.approx(list(ref["cmc"][[0, 4, 9]]), abs=1e-12)
    for k in ("mAP", "R1", "R5", "R10", "mINP"):
        assert isinstance(out[k], float) and 0.0 <= out[k] <= 1.0 and not math.isnan(out[k])
