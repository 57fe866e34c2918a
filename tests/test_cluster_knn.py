"""Exact kNN (faiss and torch backends) against a brute-force argsort."""

from __future__ import annotations

import numpy as np
import pytest

from lf2core.cluster import knn


def _feats(n=300, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_knn_matches_brute_force(backend, chunk):
    x = _feats()
    sims, idx = knn(x, 12, backend=backend, chunk_size=chunk)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :12]
    assert idx.shape == (300, 12) and idx.dtype == np.int64 and sims.dtype == np.float32
    assert np.array_equal(idx, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(s, ref, axis=1), atol=1e-5)
    assert np.array_equal(idx[:, 0], np.arange(300))


def test_self_first_with_duplicates():
    x = _feats(50, 8)
    x[10] = x[3]  # exact twins: the search may return the twin first
    sims, idx = knn(x, 5)
    assert np.array_equal(idx[:, 0], np.arange(50))
    assert 10 in idx[3] and 3 in idx[10]  # the twin is kept right after
    assert all(len(set(row)) == 5 for row in idx)
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)


def test_k_equal_n_and_errors():
    x = _feats(20, 4)
    _, idx = knn(x, 20)
    assert all(sorted(r) == list(range(20)) for r in idx)
    with pytest.raises(ValueError, match="k must be"):
        knn(x, 21)
    with pytest.raises(ValueError, match="backend"):
        knn(x, 3, backend="annoy")
    with pytest.raises(ValueError, match="NaN"):
        knn(np.full((3, 2), np.nan, np.float32), 1)


def _integer_feats(n, d, seed):
    """Small-integer features: every inner product is exact in float32 whatever the summation order, and
    many are equal (real ties, inside rows and across the k-th place)."""
    x = np.random.default_rng(seed).integers(-2, 3, size=(n, d)).astype(np.float32)
    x[5] = x[17]  # exact twins as well
    return x


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,d,k,chunk", [(300, 16, 12, 7), (1000, 40, 31, 128), (257, 8, 257, 50),
                                         (500, 3, 20, 64), (333, 5, 9, 32), (40, 6, 5, None)])
def test_torch_blocked_exact_with_ties(symmetric, n, d, k, chunk):
    """Blocked torch search == a stable float64 argsort (lowest index first among equal products): N not a
    multiple of the block, blocks with fewer rows than k + 1, k = N, heavy ties."""
    x = _integer_feats(n, d, seed=n + d)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
    sims, idx = knn(x, k, backend="torch", chunk_size=chunk, symmetric=symmetric, self_first=False,
                    index_dtype=np.int32)
    assert idx.dtype == np.int32 and idx.shape == (n, k)
    assert np.array_equal(idx, ref)
    assert np.array_equal(sims, np.take_along_axis(s, ref, axis=1).astype(np.float32))
    ties_across_cut = k < n and np.any(np.sort(s, axis=1)[:, ::-1][:, k - 1] == np.sort(s, axis=1)[:, ::-1][:, k])
    assert ties_across_cut or k == n  # the tie rule is actually exercised


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_backends_agree_with_faiss_on_float_data(symmetric):
    x = _feats(700, 48, seed=4)
    _, ref = knn(x, 31, backend="faiss")
    _, idx = knn(x, 31, backend="torch", chunk_size=200, symmetric=symmetric)
    assert np.array_equal(idx, ref)


def test_self_first_with_duplicates_torch():
    x = _feats(50, 8)
    x[10] = x[3]
    _, idx = knn(x, 5, backend="torch")
    assert np.array_equal(idx[:, 0], np.arange(50))
    assert idx[3, 1] == 10 and idx[10, 1] == 3  # the twin right after


def test_bad_index_dtype_and_chunk():
    x = _feats(20, 4)
    with pytest.raises(ValueError, match="index_dtype"):
        knn(x, 3, index_dtype=np.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(x, 3, chunk_size=0)
