"""Sparse k-reciprocal Jaccard distance + DBSCAN against a dense reference implementation.

``dense_jaccard_reference`` below is written straight from the reference semantics
(docs/method.md, section 5; SpCL's ``compute_jaccard_distance``): dense N x N matrices and
per-row Python loops. It is only usable for small N; bench/cluster.py also imports it to time the
reference algorithm at Market-1501 size.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from lf2core.cluster import dbscan_precomputed, jaccard_distance, pseudo_labels
from lf2core.cluster.jaccard import build_v, expansion_sets, reciprocal_pairs


# ------------------------------------------------------------------------------------ reference
def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.where(backward == i)[0]]


def brute_initial_rank(x: np.ndarray, k1: int) -> np.ndarray:
    """k1 nearest neighbours by inner product with a full argsort (float64), ``[N, k1]``."""
    x = x.astype(np.float64)
    return np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :k1]


def dense_jaccard_reference(features: np.ndarray, k1: int = 30, k2: int = 6, initial_rank=None,
                            dtype=np.float64, return_v: bool = False):
    """The reference algorithm, dense: returns the ``[N, N]`` Jaccard distance (and V if asked)."""
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if initial_rank is None:
        initial_rank = brute_initial_rank(x, k1)
    nn_k1 = [_k_reciprocal(initial_rank, i, k1) for i in range(n)]
    nn_k1_half = [_k_reciprocal(initial_rank, i, int(np.around(k1 / 2))) for i in range(n)]
    V = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        k_reciprocal_index = nn_k1[i]
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            cand_index = nn_k1_half[candidate]
            if len(np.intersect1d(cand_index, k_reciprocal_index)) > 2 / 3 * len(cand_index):
                expansion = np.append(expansion, cand_index)
        expansion = np.unique(expansion)
        dist = 2 - 2 * (x[i] @ x[expansion].T)
        w = np.exp(-dist - np.max(-dist))
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(n)]
    jaccard = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        temp_min = np.zeros(n, dtype=dtype)
        nonzero = np.where(V[i, :] != 0)[0]
        for c in nonzero:
            rows = inv_index[c]
            temp_min[rows] = temp_min[rows] + np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    jaccard[jaccard < 0] = 0.0
    return (jaccard, V) if return_v else jaccard


def clustered_features(n_ids: int, per_id: tuple[int, int], d: int, noise: float, seed: int) -> np.ndarray:
    """Random identities with a variable number of noisy samples each, L2-normalised float32."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(per_id[0], per_id[1] + 1, size=n_ids)
    centers = rng.standard_normal((n_ids, d))
    x = np.repeat(centers, sizes, axis=0) + noise * rng.standard_normal((int(sizes.sum()), d))
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def as_dense(dist: sp.csr_matrix) -> np.ndarray:
    """Sparse Jaccard -> dense, absent entries = 1 (explicit zeros kept)."""
    coo = dist.tocoo()
    out = np.ones(dist.shape)
    out[coo.row, coo.col] = coo.data
    return out


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    return clustered_features(n_ids=45, per_id=(3, 14), d=24, noise=0.9, seed=3)


CASES = [(30, 6), (20, 6), (13, 1), (7, 3)]


@pytest.fixture(scope="module")
def references(feats):
    return {case: dense_jaccard_reference(feats, *case, return_v=True) for case in CASES}


# ------------------------------------------------------------------------------------ tests
def test_initial_rank_has_self_first(feats):
    rank = brute_initial_rank(feats, 30)
    assert np.array_equal(rank[:, 0], np.arange(len(feats)))


def test_reciprocal_pairs_match_per_row_definition(feats):
    rank = brute_initial_rank(feats, 30)
    for k in (30, 15, 4):
        rows, cols = reciprocal_pairs(rank, k)
        for i in range(0, len(feats), 7):
            assert list(cols[rows == i]) == list(_k_reciprocal(rank, i, k))


def test_expansion_branch_is_exercised_and_matches(feats):
    """E(i) from the vectorised triplet test == the reference loop, and it does expand some rows."""
    k1 = 20
    rank = brute_initial_rank(feats, k1)
    e = expansion_sets(rank, k1)
    expanded = 0
    for i in range(len(feats)):
        r1 = _k_reciprocal(rank, i, k1)
        exp = r1
        for c in r1:
            rc = _k_reciprocal(rank, c, int(np.around(k1 / 2)))
            if len(np.intersect1d(rc, r1)) > 2 / 3 * len(rc):
                exp = np.append(exp, rc)
        exp = np.unique(exp)
        expanded += len(exp) > len(r1)
        assert np.array_equal(e.indices[e.indptr[i] : e.indptr[i + 1]], exp)
    assert expanded > len(feats) // 10  # the 2/3 expansion actually adds neighbours on this data


@pytest.mark.parametrize("k1,k2", CASES)
def test_v_matches_reference(feats, references, k1, k2):
    from lf2core.cluster.knn import knn

    sims, rank = knn(feats, k1)
    v = build_v(feats, rank, sims, k1, k2).toarray()
    _, v_ref = references[(k1, k2)]
    assert np.array_equal(v > 0, v_ref > 0)
    np.testing.assert_allclose(v, v_ref, atol=1e-6)
    np.testing.assert_allclose(v.sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.parametrize("k1,k2", CASES)
def test_jaccard_matches_dense_reference(feats, references, k1, k2):
    dist = jaccard_distance(feats, k1=k1, k2=k2)
    jac_ref, v_ref = references[(k1, k2)]
    assert isinstance(dist, sp.csr_matrix) and dist.shape == (len(feats),) * 2
    # stored pattern == pairs sharing a column of V (diagonal included, explicit zeros kept)
    share = ((v_ref > 0).astype(np.int64) @ (v_ref > 0).T.astype(np.int64)) > 0
    stored = np.zeros_like(share)
    coo = dist.tocoo()
    stored[coo.row, coo.col] = True
    assert np.array_equal(stored, share)
    assert np.all(np.diff(coo.row) >= 0) and dist.has_sorted_indices
    np.testing.assert_allclose(as_dense(dist), jac_ref, atol=1e-5, rtol=0)
    assert abs(dist - dist.T).max() == 0  # exactly symmetric
    assert 0 < (jac_ref < 0.6).mean() < 0.2  # non-trivial: some but not all pairs are close
    assert share.mean() < 1.0  # some pairs share no column (distance exactly 1, not stored)


@pytest.mark.parametrize("k1,k2", CASES)
@pytest.mark.parametrize("eps,min_samples", [(0.6, 4), (0.45, 3), (0.7, 6)])  # off the exact tie values (0.5 = 1 - (2/3)/(4/3) occurs)
def test_dbscan_partition_identical_to_sklearn_on_dense_reference(feats, references, k1, k2, eps, min_samples):
    jac_ref, _ = references[(k1, k2)]
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(jac_ref)
    got = pseudo_labels(feats, "dbscan", k1=k1, k2=k2, eps=eps, min_samples=min_samples)
    assert got.dtype == np.int64
    assert np.array_equal(got, expected)
    if (k1, k2, eps, min_samples) == (30, 6, 0.6, 4):
        assert 5 <= expected.max() + 1 and (expected == -1).any()  # clusters and outliers both occur


def test_dbscan_precomputed_matches_sklearn_with_border_points():
    """Random symmetric sparse graphs where many points are border points of several clusters."""
    rng = np.random.default_rng(0)
    for trial in range(15):
        n = int(rng.integers(20, 120))
        dense = rng.uniform(0.0, 1.0, size=(n, n))
        dense = np.minimum(dense, dense.T)
        keep = rng.uniform(size=(n, n)) < rng.uniform(0.03, 0.2)
        keep = keep | keep.T
        np.fill_diagonal(keep, trial % 2 == 0)  # with and without a stored diagonal
        dense[rng.uniform(size=(n, n)) < 0.01] = 0.0  # explicit zero distances
        dense = np.minimum(dense, dense.T)
        graph = sp.csr_matrix((dense[keep], np.nonzero(keep)), shape=(n, n))
        for eps, ms in ((0.3, 2), (0.5, 3), (0.6, 5)):
            expected = DBSCAN(eps=eps, min_samples=ms, metric="precomputed").fit_predict(graph)
            assert np.array_equal(dbscan_precomputed(graph, eps, ms), expected), (trial, eps, ms)


@pytest.mark.parametrize("k1,k2", CASES[:2])
def test_max_distance_prunes_exactly(feats, k1, k2):
    full = jaccard_distance(feats, k1=k1, k2=k2)
    pruned = jaccard_distance(feats, k1=k1, k2=k2, max_distance=0.6)
    coo = full.tocoo()
    keep = (coo.data <= 0.6) | (coo.row == coo.col)
    expected = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=full.shape)
    assert pruned.nnz == keep.sum() < full.nnz / 3
    assert np.array_equal(pruned.indptr, expected.indptr) and np.array_equal(pruned.indices, expected.indices)
    assert np.array_equal(pruned.data, expected.data)
    assert np.array_equal(dbscan_precomputed(pruned, 0.6, 4), dbscan_precomputed(full, 0.6, 4))


def test_fewer_samples_than_k1():
    x = clustered_features(n_ids=4, per_id=(3, 5), d=8, noise=0.5, seed=1)
    ref = dense_jaccard_reference(x, k1=len(x), k2=3)  # the reference needs k1 <= N
    np.testing.assert_allclose(as_dense(jaccard_distance(x, k1=50, k2=3)), ref, atol=1e-5)


def test_unnormalised_input_is_normalised(feats):
    a = jaccard_distance(feats, k1=20, k2=6)
    b = jaccard_distance(feats * 3.0, k1=20, k2=6)
    assert np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((5,)), "2-D"),
    (np.full((4, 3), np.nan), "NaN"),
    (np.zeros((4, 3)), "all-zero"),
    (np.ones((4, 3), dtype=np.int64), "floating"),
])
def test_bad_features_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        jaccard_distance(bad)


def test_bad_k_raises(feats):
    with pytest.raises(ValueError, match="k1"):
        jaccard_distance(feats, k1=0)


def test_many_blocks_and_chunks_give_the_same_matrix(feats, references, monkeypatch):
    """Tiny block / buffer / chunk sizes (many blocks, rows split across output chunks, expansion in chunks
    of 7 rows) change nothing."""
    from lf2core.cluster import jaccard as jac
    from lf2core.cluster import minsum

    base = jaccard_distance(feats, k1=20, k2=6)
    monkeypatch.setattr(minsum, "MINSUM_BLOCK_TERMS", 997)
    monkeypatch.setattr(minsum, "MINSUM_BUFFER", 3 * len(feats) + 5)
    monkeypatch.setattr(minsum._ChunkedOutput, "CHUNK", 1009)
    monkeypatch.setattr(jac, "EXPANSION_CHUNK_ROWS", 7)
    small = jaccard_distance(feats, k1=20, k2=6)
    assert np.array_equal(small.indptr, base.indptr) and np.array_equal(small.indices, base.indices)
    assert np.array_equal(small.data, base.data)
    np.testing.assert_allclose(as_dense(small), references[(20, 6)][0], atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_full_path_labels_identical_to_dense_reference_high_dim(backend):
    """d >= 1024: the torch backend takes its symmetric path; features -> labels through ``pseudo_labels``
    equals sklearn DBSCAN on the dense reference built from a float64 brute-force ranking."""
    x = clustered_features(n_ids=30, per_id=(2, 16), d=1024, noise=1.6, seed=5)
    jac_ref = dense_jaccard_reference(x, 30, 6)
    expected = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(jac_ref)
    timings: dict = {}
    got = pseudo_labels(x, "dbscan", k1=30, k2=6, eps=0.6, min_samples=4, knn_backend=backend, timings=timings)
    assert np.array_equal(got, expected)
    assert timings["knn_backend"] == backend and set(timings) >= {"knn_s", "v_s", "minsum_s", "dbscan_s"}
    assert expected.max() >= 3 and (expected == -1).any()


def test_jaccard_from_v_equals_brute_force_min_sum():
    """Step 6 alone on an arbitrary row-stochastic sparse V (rows of 1 to 12 entries, ties, a column
    shared by many rows): the upper-triangle computation + mirror equals a dense double loop over pairs,
    stores exactly the pairs that share a column (explicit zeros and the diagonal included), symmetric."""
    from lf2core.cluster.jaccard import jaccard_from_v

    rng = np.random.default_rng(5)
    n = 40
    rows, cols, vals = [], [], []
    for i in range(n):
        c = rng.choice(n, size=int(rng.integers(1, 13)), replace=False)
        c = np.union1d(c, [7]) if i % 3 == 0 else c  # column 7: a long inverted list
        w = rng.integers(1, 4, size=len(c)).astype(np.float64)  # small integers: ties between rows
        rows += [i] * len(c)
        cols += list(c)
        vals += list(w / w.sum())
    v = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, n))
    dense_v = v.toarray().astype(np.float64)
    shared = (dense_v > 0).astype(int) @ (dense_v > 0).T.astype(int) > 0
    m = np.minimum(dense_v[:, None, :], dense_v[None, :, :]).sum(axis=2)
    expected = np.where(shared, np.maximum(1.0 - m / (2.0 - m), 0.0), 1.0)
    for max_distance in (None, 0.5):
        out = jaccard_from_v(v, max_distance=max_distance)
        keep = shared if max_distance is None else shared & ((expected <= max_distance) | np.eye(n, dtype=bool))
        stored = np.zeros((n, n), dtype=bool)
        coo = out.tocoo()
        stored[coo.row, coo.col] = True
        assert coo.nnz == len(set(zip(coo.row.tolist(), coo.col.tolist())))  # no duplicates
        assert np.array_equal(stored, keep)
        assert out.has_sorted_indices and all(np.all(np.diff(out.indices[out.indptr[i]:out.indptr[i + 1]]) > 0)
                                              for i in range(n))
        np.testing.assert_allclose(coo.data, expected[coo.row, coo.col], atol=1e-6)
        assert (out != out.T).nnz == 0
        assert keep.diagonal().all() and np.abs(out.diagonal()).max() < 1e-6  # m(i, i) = row sum = 1 (float32)


def _mmt_eps(dense: np.ndarray, rho: float) -> float:
    """MMT's rule written as MMT does it: sort the upper triangle of the dense matrix, mean of the top."""
    tri = np.sort(dense[np.triu_indices(len(dense), 1)])
    return float(tri[:max(1, int(round(rho * tri.size)))].mean())


@pytest.mark.parametrize("rho", [1.6e-3, 2e-2, 0.2, 0.9])
def test_rho_eps_equals_the_dense_rule(feats, references, rho):
    """On the full sparse matrix (absent = 1) the rule equals MMT's dense computation, also when the
    share reaches into the absent pairs (rho 0.9)."""
    from lf2core.cluster.labels import rho_eps

    dense = references[(20, 6)][0]
    got = rho_eps(jaccard_distance(feats, k1=20, k2=6), rho)
    assert got == pytest.approx(_mmt_eps(dense, rho), abs=1e-6)


def test_rho_eps_of_a_pruned_matrix_is_undetermined_when_too_few_pairs_stored(feats):
    from lf2core.cluster.labels import rho_eps

    pruned = jaccard_distance(feats, k1=20, k2=6, max_distance=0.05)
    assert rho_eps(pruned, 0.2, cap=0.05) is None
    full = jaccard_distance(feats, k1=20, k2=6)
    half = jaccard_distance(feats, k1=20, k2=6, max_distance=0.5)
    assert rho_eps(half, 1e-3, cap=0.5) == rho_eps(full, 1e-3)  # the 72 smallest pairs are all below 0.5


def test_auto_eps_labels_equal_dbscan_on_the_full_matrix_and_the_cap_fallback(feats, references, monkeypatch):
    from lf2core.cluster import settings as lab  # where auto_eps reads its cap

    dense = references[(30, 6)][0]
    rho = 1e-2
    want_eps = _mmt_eps(dense, rho)
    want = DBSCAN(eps=want_eps, min_samples=4, metric="precomputed").fit_predict(dense)
    for cap in (lab.AUTO_EPS_CAP, 0.01):  # 0.01: too few pairs below the cap -> the uncapped matrix
        monkeypatch.setattr(lab, "AUTO_EPS_CAP", cap)
        chosen: dict = {}
        got = pseudo_labels(feats, "dbscan", k1=30, k2=6, eps="auto", eps_rho=rho, min_samples=4, chosen=chosen)
        assert chosen["eps"] == pytest.approx(want_eps, abs=1e-6)
        assert np.array_equal(got, want)
    assert len(np.unique(want[want >= 0])) > 3  # a real clustering, not all outliers


def test_pseudo_labels_rejects_a_word_other_than_auto(feats):
    with pytest.raises(ValueError, match="'auto'"):
        pseudo_labels(feats, "dbscan", eps="fixed")


@pytest.mark.parametrize("k1", [7, 20])
def test_reciprocal_share_counts_k_reciprocal_neighbours(feats, k1):
    """The data's share: mean |R(i, k1)| - 1 over N - 1, against the per-row definition on a brute-force rank."""
    from lf2core.cluster.labels import reciprocal_share

    rank = brute_initial_rank(feats, k1)
    per_image = np.mean([len(_k_reciprocal(rank, i, k1)) - 1 for i in range(len(feats))])
    assert per_image > 1
    assert reciprocal_share(rank, k1) == pytest.approx(per_image / (len(feats) - 1), rel=1e-12)


def test_auto_eps_default_share_is_the_reciprocal_one(feats):
    from lf2core.cluster.labels import reciprocal_share, rho_eps

    chosen: dict = {}
    pseudo_labels(feats, "dbscan", k1=20, k2=6, eps="auto", chosen=chosen)
    share = reciprocal_share(brute_initial_rank(feats, 20), 20)
    assert chosen["eps_rho"] == pytest.approx(share, rel=1e-12)
    assert chosen["eps"] == pytest.approx(rho_eps(jaccard_distance(feats, k1=20, k2=6), share), abs=1e-6)
