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
    assert out["cold"]["recall@10_hw95"] == pytest.approx(1.96 * np.sqrt(0.25 / 2))
    assert "| m | 0.5000 | 0.5000 | 0.5000 ± 0.6930 | 0.5000 | 0.0000 | 0.0000 | 0.5000 ± 0.6930 |" in table


def test_sample_segments_caps_each_segment_and_keeps_order():
    from cobra_scale.eval.cold_start import recall_half_width, sample_segments

    segs = {"in_set": np.arange(0, 100, 2), "cold": np.array([1, 3, 5])}
    got = sample_segments(segs, 10, seed=0)
    assert len(got["in_set"]) == 10 and set(got["in_set"]) <= set(segs["in_set"]) and np.all(np.diff(got["in_set"]) > 0)
    assert got["cold"].tolist() == [1, 3, 5]  # smaller than the cap: all of it
    assert np.array_equal(sample_segments(segs, 10, seed=0)["in_set"], got["in_set"])  # seeded
    assert sample_segments(segs, 0)["in_set"] is segs["in_set"]
    assert recall_half_width(0.0, 50) == 0.0 and recall_half_width(0.3, 0) == 0.0


@pytest.mark.slow
def test_coldstart_command_end_to_end(tmp_path):
    """loo_cold split of a tiny dataset -> full and w/o-Dense runs -> `cobra coldstart` table."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cobra_scale.config import load_config
    from cobra_scale.data.configs import SplitConfig
    from cobra_scale.data.io import write_table
    from cobra_scale.data.schemas import SEQUENCES_SCHEMA
    from cobra_scale.data.split import split_files
    from cobra_scale.eval.cold_start import run as coldstart
    from cobra_scale.eval.configs import ColdStartConfig
    from cobra_scale.train.configs import TrainConfig
    from cobra_scale.train.trainer import run as train
    from tests.model.fixtures import tiny_dataset
    from tests.retrieve.fixtures import SMALL

    data = tiny_dataset(tmp_path / "data")
    test = pq.read_table(data / "splits" / "loo" / "test").to_pylist()  # histories are whole (<= 12 items)
    rows = [{"user_id": r["user_id"], "item_ids": r["history"] + r["targets"], "timestamps": None} for r in test]
    write_table(pa.Table.from_pylist(rows, schema=SEQUENCES_SCHEMA), data / "sequences" / "part-00000.parquet")
    report = split_files(SplitConfig(sequences=str(data / "sequences"), out=str(data / "splits" / "loo_cold"), kind="loo_cold", cold_fraction=0.2, seed=0))
    assert report["cold_items"] > 0 and report["test_users_cold_target"] > 0
    common = [f"data={data}", f"ids={data / 'ids'}", "split=loo_cold", *SMALL]
    train(load_config(TrainConfig, dotlist=[*common, f"out={tmp_path / 'full'}", "same_id_negatives=4"]))
    train(load_config(TrainConfig, dotlist=[*common, f"out={tmp_path / 'sparse'}", "model.use_dense=false", "dedup_level=true", "inference.mode=sparse_only"]))
    got = coldstart(load_config(ColdStartConfig, dotlist=[f"run={tmp_path / 'full'}", f"sparse_run={tmp_path / 'sparse'}", f"out={tmp_path / 'cs'}", "liger_beams=4"]))
    result = json.loads((tmp_path / "cs" / "coldstart.json").read_text())
    assert set(result["rows"]) == {"COBRA (cobra)", "LIGER mode", "COBRA (no_fusion)", "COBRA w/o Dense (TIGER-like)"}
    for row in result["rows"].values():
        assert row["cold"]["users"] == report["test_users_cold_target"]
        assert row["in_set"]["users"] + row["cold"]["users"] == len(test)
        assert all(0.0 <= row[s]["recall@10"] <= 1.0 for s in ("in_set", "cold"))
    assert result["cold_items"] == report["cold_items"]
    assert "LIGER mode" in (tmp_path / "cs" / "coldstart.md").read_text() and got["table"].endswith("coldstart.md")
    # a run trained on a split without cold items is refused with a message, not a traceback
    from cobra_scale.errors import DataError

    train(load_config(TrainConfig, dotlist=[f"data={data}", f"ids={data / 'ids'}", f"out={tmp_path / 'loo'}", *SMALL]))
    with pytest.raises(DataError, match="cold_items.parquet"):
        coldstart(load_config(ColdStartConfig, dotlist=[f"run={tmp_path / 'loo'}"]))
