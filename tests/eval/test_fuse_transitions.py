"""tools/fuse_transitions.py: the count distribution by hand, the mixture end to end on a tiny run, clear errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cobra_scale.config import load_config
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import run
from tests.model.fixtures import tiny_dataset
from tests.model.test_train import SMALL

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuse_transitions.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("fuse_transitions", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_scores_by_hand(tool):
    # 3 items; counts 0->1: 2, 0->2: 1, 1->2: 4 (the matrix is indexed by item + 1; row/column 0 is padding)
    m = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 0, 2, 1], [0, 0, 0, 4], [0, 0, 0, 0]], np.float32))
    history = np.array([[-1, 0, 1], [-1, -1, 2]])
    s = tool.count_scores(m, history, context=2, decay=0.5).numpy()
    raw = 0.5 * np.array([0, 2, 1]) + 1.0 * np.array([0, 0, 4])  # the older item weighted by decay
    assert np.allclose(s[0], raw / raw.sum())
    assert np.allclose(s[1], 0)  # item 2 is followed by nothing: no mass, not NaN


def test_mixture_end_to_end(tool, tmp_path):
    data = tiny_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    run(load_config(TrainConfig, dotlist=[f"data={data}", f"ids={data / 'ids'}", f"out={out}", *SMALL, "epochs=1"]))
    assert tool.main(["--run", str(out), "--tau", "1", "--psi", "20", "--beams", "8", "--valid-users", "0", "--lams", "0,0.5,1"]) == 0
    res = json.loads((out / "fuse_transitions.json").read_text())
    assert res["chosen_lam"] in (0.0, 0.5, 1.0) and set(res["valid"]) >= {"0.0", "0.5", "1.0"}
    # the tiny data's next item is its predecessor's fixed successor: the count alone finds it
    assert res["test"]["1.0"]["kept"]["recall@10"] == pytest.approx(1.0)
    for lam in ("0.0", "1.0"):
        r = res["test"][lam]["kept"]
        assert 0 <= r["ndcg@10"] <= r["recall@10"] <= 1 and r["recall@5"] <= r["recall@10"]
    assert 0 <= res["test"]["target_in_cobra_candidates"]["target_in_cobra_candidates"] <= 1


def test_bad_arguments(tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--run", "x", "--tau", "1", "--psi", "1", "--lams", "0,2"])
    assert "[0, 1]" in capsys.readouterr().err
    assert tool.main(["--run", str(tmp_path / "missing"), "--tau", "1", "--psi", "1"]) == 2
    assert "error:" in capsys.readouterr().err
