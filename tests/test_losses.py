"""Losses against hand-computed cases and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lf2core.losses import (
    CrossEntropyLabelSmooth,
    SoftTripletLoss,
    TripletLoss,
    euclidean_dist,
    hard_example_mining,
    triplet_loss,
)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_label_smooth_ce_hand_case():
    # logits [2, 0, 0], target 0, eps 0.1, N = 3: q = [0.9 + 0.1/3, 0.1/3, 0.1/3]
    z = math.log(math.exp(2) + 2)
    logp = [2 - z, -z, -z]
    q = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    expected = -sum(a * b for a, b in zip(q, logp))
    loss = CrossEntropyLabelSmooth(3, 0.1)(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smooth_ce_matches_torch_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=g)
    y = torch.randint(0, 7, (16,), generator=g)
    ours = CrossEntropyLabelSmooth(7, 0.1)(logits, y)
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(CrossEntropyLabelSmooth(7, 0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    with pytest.raises(ValueError):
        CrossEntropyLabelSmooth(5)(logits, y)


# 1-D features: distances are |xi - xj|.
X = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
Y = torch.tensor([0, 0, 1, 1])
# anchor: (d_ap, d_an) = 0:(1,3) 1:(1,2) 2:(4,2) 3:(4,6)
HAND = [(1, 3), (1, 2), (4, 2), (4, 6)]


def test_hard_mining_hand_case():
    d_ap, d_an = hard_example_mining(euclidean_dist(X, X), Y)
    assert torch.allclose(d_ap, torch.tensor([a for a, _ in HAND], dtype=torch.float), atol=1e-5)
    assert torch.allclose(d_an, torch.tensor([n for _, n in HAND], dtype=torch.float), atol=1e-5)


def test_batch_hard_triplet_hand_case():
    loss = TripletLoss(margin=0.5)(X, Y)
    expected = sum(max(0.0, a - n + 0.5) for a, n in HAND) / 4  # = 2.5 / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.625)


def test_soft_triplet_margin0_is_softplus_hand_case():
    loss = SoftTripletLoss(0.0)(X, Y)
    expected = sum(softplus(a - n) for a, n in HAND) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert isinstance(triplet_loss(0.0), SoftTripletLoss)
    assert isinstance(triplet_loss(0.3), TripletLoss)


def test_soft_triplet_general_margin_is_mmt_log_softmax_form():
    m = 0.3
    loss = SoftTripletLoss(m)(X, Y)
    expected = 0.0
    for a, n in HAND:
        lse = math.log(math.exp(a) + math.exp(n))
        expected += -(m * (a - lse) + (1 - m) * (n - lse))
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


def test_triplets_match_brute_force_on_random_batch():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(24, 8, generator=g)
    labels = torch.arange(6).repeat_interleave(4)
    exp_hard, exp_soft = 0.0, 0.0
    for i in range(24):
        dists = [float(torch.sqrt(((feats[i] - feats[j]) ** 2).sum())) for j in range(24)]
        ap = max(dists[j] for j in range(24) if labels[j] == labels[i])
        an = min(dists[j] for j in range(24) if labels[j] != labels[i])
        exp_hard += max(0.0, ap - an + 0.3)
        exp_soft += softplus(ap - an)
    assert TripletLoss(0.3)(feats, labels).item() == pytest.approx(exp_hard / 24, rel=1e-4)
    assert SoftTripletLoss(0.0)(feats, labels).item() == pytest.approx(exp_soft / 24, rel=1e-4)


def test_triplet_gradients_finite_and_single_label_batch():
    feats = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    SoftTripletLoss()(feats, labels).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    # one identity only: no negatives -> zero loss, no NaN
    same = torch.zeros(4, dtype=torch.long)
    assert SoftTripletLoss()(torch.randn(4, 3), same).item() == 0.0
    assert TripletLoss(0.3)(torch.randn(4, 3), same).item() == 0.0
