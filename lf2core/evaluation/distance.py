"""Query x gallery distances: squared Euclidean, and k-reciprocal re-ranking (Zhong et al., CVPR 2017)."""

from __future__ import annotations

import numpy as np
import torch

from .inputs import ArrayLike, EvaluationError, to_float_tensor


def pairwise_distance(q: ArrayLike, g: ArrayLike, *, chunk_size: int = 1024) -> np.ndarray:
    """Squared Euclidean distances ``||q_i - g_j||^2`` (= 2 - 2 q.g for L2-normalised features).

    Args:
        q: [Q, D] query features; g: [G, D] gallery features (numpy or torch; computed in float32,
            or float64 if both inputs are float64).
        chunk_size: query rows per matrix product.

    Returns:
        [Q, G] numpy array, clipped below at 0.
    """
    qt = to_float_tensor(q, "q")
    gt = to_float_tensor(g, "g")
    if qt.shape[1] != gt.shape[1]:
        raise EvaluationError(f"feature dimensions differ: q has {qt.shape[1]}, g has {gt.shape[1]}")
    dtype = torch.float64 if (qt.dtype == torch.float64 and gt.dtype == torch.float64) else torch.float32
    qt, gt = qt.to(dtype), gt.to(dtype)
    g2 = (gt * gt).sum(1)  # [G]
    out = torch.empty(qt.shape[0], gt.shape[0], dtype=dtype)
    for s in range(0, qt.shape[0], chunk_size):
        qc = qt[s : s + chunk_size]
        blk = out[s : s + chunk_size]
        torch.mm(qc, gt.t(), out=blk)
        blk.mul_(-2).add_((qc * qc).sum(1, keepdim=True)).add_(g2[None, :]).clamp_(min=0)
    return out.numpy()


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rerank(
    q_feat: ArrayLike,
    g_feat: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a query x gallery problem.

    Features are L2-normalised, then ``X = [q_feat; g_feat]`` ([N = Q+G, D]) goes through
    ``lf2core.cluster.jaccard_distance(X, k1, k2)`` (sparse k-reciprocal Jaccard distance; absent
    entries mean distance 1). The final distance is

        final[i, j] = (1 - lambda) * jaccard[i, Q + j] + lambda * orig[i, j]

    with ``orig[i, j] = d(q_i, g_j) / max_{x in X} d(q_i, x)`` and ``d`` the squared Euclidean distance of
    the normalised features: the original distance scaled to [0, 1] by the query's largest distance to
    any query or gallery feature, as in the reference implementation (which normalises the rows of its
    full (Q+G) x (Q+G) distance matrix by their maxima; the common re-implementations square the
    distances once more, which we do not).

    Args:
        q_feat: [Q, D]; g_feat: [G, D] features (numpy or torch).
        k1, k2: neighbourhood sizes (k1 must be < Q + G).
        lambda_value: weight of the original distance, in [0, 1].

    Returns:
        [Q, G] float32 numpy distance matrix.
    """
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise EvaluationError(f"lambda_value: must be in [0, 1], got {lambda_value}")
    qt = to_float_tensor(q_feat, "q_feat").float()
    gt = to_float_tensor(g_feat, "g_feat").float()
    if qt.shape[1] != gt.shape[1]:
        raise EvaluationError(f"feature dimensions differ: q_feat has {qt.shape[1]}, g_feat has {gt.shape[1]}")
    nq, ng = qt.shape[0], gt.shape[0]
    if int(k1) >= nq + ng:
        raise EvaluationError(f"k1: must be smaller than the number of query + gallery features ({nq + ng}), got {k1}")
    try:
        from ..cluster import jaccard_distance
    except ImportError as exc:  # pragma: no cover - depends on the cluster module being present
        raise NotImplementedError(
            "rerank needs lf2core.cluster.jaccard_distance, which is not available in this build"
        ) from exc
    x = _l2_normalise(torch.cat([qt, gt], 0))
    xq, xg = x[:nq], x[nq:]
    jac = jaccard_distance(x.numpy(), k1=int(k1), k2=int(k2))
    jac = jac.tocsr()[:nq].tocoo()
    final = np.ones((nq, ng), dtype=np.float32)
    gmask = jac.col >= nq
    final[jac.row[gmask], jac.col[gmask] - nq] = jac.data[gmask]
    final *= 1.0 - float(lambda_value)
    d_qg = torch.from_numpy(pairwise_distance(xq, xg))  # [Q, G] float32
    row_max = d_qg.amax(dim=1)
    chunk = 1024
    for s in range(0, nq, chunk):  # max over query rows too, in chunks
        row_max[s : s + chunk] = torch.maximum(
            row_max[s : s + chunk], torch.from_numpy(pairwise_distance(xq[s : s + chunk], xq)).amax(dim=1)
        )
    d_qg.div_(row_max.clamp_min(1e-12)[:, None]).mul_(float(lambda_value))  # in place: no extra [Q, G]
    final += d_qg.numpy()
    return final

