"""tools/diagnose_repeats.py: training prefixes, the counts by hand on a rigged recommender, end to end on a tiny run."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "diagnose_repeats.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("diagnose_repeats", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_prefixes_cut_before_a_real_next_item(tool):
    seqs = [np.array([5, 6, 7, 8]), np.array([1]), np.array([2, 3])]
    history, targets = tool.training_prefixes(seqs, 10, 3, seed=0)
    assert len(targets) == 2  # the 1-item sequence has no next item
    for h, t in zip(history.tolist(), targets.tolist()):
        real = [x for x in h if x >= 0]
        seq = [s for s in seqs if t in s.tolist()][0].tolist()
        assert real and seq[seq.index(t) - len(real): seq.index(t)] == real  # the items just before the target


def test_repeat_stats_by_hand(tool):
    from tests.model.test_cobra import catalogue, tiny_model
    from cobra_scale.retrieve.recommender import InferenceParams, Recommender

    model = tiny_model()
    tokens, mask, codes = catalogue()
    rec = Recommender(model, codes, model.encode_items(tokens, mask))
    history = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    params = InferenceParams("cobra", 12)
    items, _ = rec.recommend(history, 10, params)
    targets = np.array([1, items[1, 0].item()])  # user 0's target is its own history item; user 1's is its top pick
    got = tool.repeat_stats(rec, history, targets, params)
    in_hist = [[i in row for i in top] for row, top in zip(([0, 1], [2, 3, 4]), items.tolist())]
    assert got["top1_is_history"] == pytest.approx(np.mean([r[0] for r in in_hist]))
    assert got["history_in_top10"] == pytest.approx(np.mean([sum(r) for r in in_hist]))
    assert got["target_id_is_history_id"] == pytest.approx(0.5 + 0.5 * (targets[1] in (2, 3, 4)))  # IDs are unique per item here
    assert got["hit@10"] == pytest.approx((float(1 in items[0].tolist()) + 1.0) / 2)


def test_end_to_end_on_a_tiny_run(tool, tmp_path, capsys):
    from tests.retrieve.fixtures import tiny_run

    run = tiny_run(tmp_path / "r")
    assert tool.main(["--run", str(run), "--users", "40", "--beams", "8"]) == 0
    res = json.loads((run / "repeats.json").read_text())
    for part in ("test_users", "training_prefixes"):
        assert 0 <= res[part]["top1_is_history"] <= 1 and 0 <= res[part]["history_in_top10"] <= 10
    assert tool.main(["--run", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
