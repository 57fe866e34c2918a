"""Person re-ID retrieval metrics (mAP, CMC, mINP), distances and k-reciprocal re-ranking.

Protocol (torchreid / Market-1501, the one every UDA re-ID paper reports):

- For each query, gallery entries with the **same identity AND the same camera** as the query are
  dropped (they are too easy); gallery entries of other identities (including distractors, pid 0) stay.
- A query with no remaining true match is skipped; if no query has one, ``ValueError`` is raised.
- Ranking: gallery sorted by ascending distance with a **stable sort, so ties are broken by gallery
  index** (the lower index ranks first). This is deterministic; sklearn's ``average_precision_score``
  treats tied scores as one threshold instead, so the two agree exactly only when there are no ties
  between a true match and a non-match.
- CMC (market1501 style): ``cmc[k]`` = fraction of valid queries with a true match among their top k+1.
  ``cmc`` always has ``max_rank`` entries; positions beyond the number of gallery entries a query keeps
  are 1 for that query (its matches are all ranked by then).
- AP of a query = mean over its true matches of the precision at the match's rank; mAP = mean AP.
- mINP (Ye et al. 2021, as in torchreid): INP = num_true_matches / (rank of the hardest match, 1-based).

All metrics are fractions in [0, 1].

The package: ``ranking`` (``evaluate_rank``, ``valid_topk``), ``distance`` (``pairwise_distance``,
``rerank``) and ``inputs`` (input checks, ``EvaluationError``); ``evaluate_features`` (distances, then
ranking) is defined here.
"""

from __future__ import annotations

from typing import Any

from .distance import pairwise_distance, rerank
from .inputs import ArrayLike, EvaluationError
from .ranking import evaluate_rank, valid_topk

__all__ = ["ArrayLike", "EvaluationError", "evaluate_features", "evaluate_rank", "pairwise_distance", "rerank",
           "valid_topk"]

_rerank = rerank  # evaluate_features' ``rerank`` flag shadows the function name


def evaluate_features(
    q_feat: ArrayLike,
    g_feat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    rerank: bool = False,
    *,
    max_rank: int = 50,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict[str, Any]:
    """Distances (squared Euclidean, or re-ranked) then ``evaluate_rank``.

    Args:
        q_feat: [Q, D], g_feat: [G, D] features (L2-normalised by the extractor); ids as in ``evaluate_rank``.
        rerank: use k-reciprocal re-ranking (``rerank(q_feat, g_feat, k1, k2, lambda_value)``).

    Returns:
        ``{"mAP", "R1", "R5", "R10", "mINP"}`` (floats in [0, 1]), ``"cmc"`` [max_rank] and
        ``"distmat"`` [Q, G] numpy (for the rank-list plot).
    """
    if rerank:
        distmat = _rerank(q_feat, g_feat, k1=k1, k2=k2, lambda_value=lambda_value)
    else:
        distmat = pairwise_distance(q_feat, g_feat)
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max(10, int(max_rank)))
    cmc = res["cmc"]
    return {
        "mAP": res["mAP"],
        "R1": float(cmc[0]),
        "R5": float(cmc[4]),
        "R10": float(cmc[9]),
        "mINP": res["mINP"],
        "cmc": cmc[: int(max_rank)],
        "distmat": distmat,
    }
