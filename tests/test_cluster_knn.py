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
