"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from cobra_scale.eval.metrics import MetricAccumulator, metric_names, rank_metrics, topk_with_exclusion

# Ranked lists of 10 items (ids 100..109 in order) for 4 users.
RANKED = np.tile(np.arange(100, 110, dtype=np.int64), (4, 1))


def test_single_target_hand_computed():
    # targets at 0-based rank 0, 4, 9 and absent
    targets = np.array([100, 104, 109, 555])
    m = rank_metrics(RANKED, targets, ks=(5, 10))
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(6)) / 4)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)
    assert list(m) == metric_names((5, 10))


def test_single_target_forms_agree():
    targets = np.array([100, 104, 109, 555])
    a = rank_metrics(RANKED, targets)
    b = rank_metrics(RANKED, targets[:, None])
    c = rank_metrics(RANKED, [np.array([t]) for t in targets])
    assert a == b == c


def test_multi_target():
    ranked = np.array([[1, 2, 3, 4, 5, 6]])
    # targets 2 (rank 1) and 6 (rank 5) and 9 (absent): |T| = 3
    m = rank_metrics(ranked, [np.array([9, 2, 6])], ks=(2, 6))
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@6"] == pytest.approx(2 / 3)
    d = lambda r: 1 / math.log2(r + 2)  # noqa: E731
    assert m["ndcg@2"] == pytest.approx(d(1) / (d(0) + d(1)))  # ideal over min(3, 2) = 2
    assert m["ndcg@6"] == pytest.approx((d(1) + d(5)) / (d(0) + d(1) + d(2)))  # ideal over 3
    # all targets at the top: perfect
    perfect = rank_metrics(ranked, [np.array([2, 1])], ks=(2, 6))
    assert perfect == {"recall@2": 1.0, "ndcg@2": 1.0, "recall@6": 1.0, "ndcg@6": 1.0}


def test_users_without_targets_are_skipped_and_accumulator_streams():
    acc = MetricAccumulator(ks=(5,))
    acc.update(RANKED[:2], [np.array([100]), np.array([], dtype=np.int64)])
    acc.update(torch.as_tensor(RANKED[2:]), np.array([109, 101]))
    assert acc.count == 3
    assert acc.result()["recall@5"] == pytest.approx(2 / 3)
    assert acc.result()["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)
    assert MetricAccumulator().result()["recall@10"] == 0.0


def test_bad_k_raises():
    with pytest.raises(ValueError):
        rank_metrics(RANKED[:, :5], np.array([1, 2, 3, 4]), ks=(10,))


def test_topk_with_exclusion_padded_and_lists():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert topk_with_exclusion(scores, 2).tolist() == [[0, 1], [4, 3]]
    padded = torch.tensor([[0, 2], [4, -1]])
    assert topk_with_exclusion(scores, 3, padded).tolist() == [[1, 3, 4], [3, 2, 1]]
    assert scores[0, 0] == pytest.approx(0.9)  # not modified
    lists = [np.array([0, 2]), np.array([], dtype=np.int64)]
    assert topk_with_exclusion(scores, 3, lists).tolist() == [[1, 3, 4], [4, 3, 2]]
    topk_with_exclusion(scores, 1, [[1], [1]], inplace=True)
    assert torch.isinf(scores[:, 1]).all()
