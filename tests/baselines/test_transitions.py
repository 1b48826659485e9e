"""tools/baseline_transitions.py: exact counts, a learnable pattern, clear errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.baselines.test_sasrec import ITEM_IDS, N_ITEMS, write_dataset

TOOL = Path(__file__).resolve().parents[2] / "tools" / "baseline_transitions.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("baseline_transitions", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_transition_counts_by_hand(tool):
    # two sequences of indices: [1, 2, 3] and [2, 3]; pairs never cross sequences
    values, offsets = np.array([1, 2, 3, 2, 3]), np.array([0, 3, 5])
    m = tool.transition_matrix(values, offsets, 3, window=1, both=False, normalise=False).toarray()
    assert m[1, 2] == 1 and m[2, 3] == 2 and m[3, 2] == 0 and m.sum() == 3
    m2 = tool.transition_matrix(values, offsets, 3, window=2, both=True, normalise=False).toarray()
    assert m2[1, 3] == 1 and m2[3, 1] == 1 and m2[3, 2] == 2 and m2.sum() == 8
    mn = tool.transition_matrix(values, offsets, 3, window=2, both=False, normalise=True).toarray()
    assert np.allclose(mn.sum(axis=1)[1:3], 1.0) and mn[3].sum() == 0


def test_learns_successor_pattern(tool, tmp_path):
    # item k is always followed by item k+1: the last item's successor is the target
    write_dataset(tmp_path / "data")
    res = tool.run(tmp_path / "data", "loo", tmp_path / "out", [1, 2], [0.5, 1.0], 3, [1, 5])
    assert res["test"]["kept"]["recall@1"] == pytest.approx(1.0)
    assert res["chosen"]["both_directions"] is False
    assert res["data_stats"]["test"]["target_follows_last_item_in_train"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["test"]["kept"]["recall@1"] == pytest.approx(1.0) and len(saved["grid"]) == 2 * 2 * 2 * 2
    assert N_ITEMS == len(ITEM_IDS)


def test_bad_arguments_exit_2(tool, tmp_path, capsys):
    assert tool.main(["--data", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert tool.main(["--windows", "0"]) == 2
