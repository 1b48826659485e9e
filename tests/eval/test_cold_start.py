"""Segment metrics of `cobra coldstart` on a hand-made case."""

import numpy as np
import pytest
import torch

from cobra_scale.eval.cold_start import evaluate_segments, markdown_table, segment_users
from cobra_scale.retrieve.recommender import InferenceParams


class FixedRanking:
    """A recommender whose ranking for a user is a row of a table keyed by the user's
    first history item."""

    def __init__(self, rankings: dict[int, list[int]]):
        self.rankings = rankings

    def recommend(self, history, k, params):
        rows = [self.rankings[int(h[0])][:k] for h in history]
        return torch.tensor(rows), torch.zeros(len(rows), k)


def test_segments_split_users_by_target_and_score_each_segment():
    cold = np.array([50, 51])
    # users 0..3: targets 7 (in-set), 50 (cold), 8 (in-set), 51 (cold)
    history = torch.tensor([[0], [1], [2], [3]])
    targets = [np.array([7]), np.array([50]), np.array([8]), np.array([51])]
    segs = segment_users(targets, cold)
    assert segs["in_set"].tolist() == [0, 2] and segs["cold"].tolist() == [1, 3]
    rec = FixedRanking(
        {
            0: [7, 1, 2, 3, 4, 5, 6, 9, 10, 11],  # hit at rank 1
            1: [1, 2, 3, 4, 5, 6, 50, 9, 10, 11],  # cold hit at rank 7
            2: [1, 2, 3, 4, 5, 6, 9, 10, 11, 12],  # miss
            3: [1, 2, 3, 4, 5, 6, 9, 10, 11, 12],  # miss
        }
    )
    out = evaluate_segments(rec, history, targets, InferenceParams(), segs, batch_users=3, device="cpu")
    assert out["in_set"]["users"] == 2 and out["cold"]["users"] == 2
    assert out["in_set"]["recall@5"] == pytest.approx(0.5) and out["in_set"]["ndcg@5"] == pytest.approx(0.5)
    assert out["cold"]["recall@5"] == 0.0 and out["cold"]["recall@10"] == pytest.approx(0.5)
    assert out["cold"]["ndcg@10"] == pytest.approx(0.5 / np.log2(8))
    table = markdown_table({"split": "s", "split_name": "test", "cold_items": 2, "rows": {"m": out}})
    assert "| m | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.0000 | 0.0000 | 0.5000 |" in table
