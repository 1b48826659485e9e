"""tools/load_test.py: the fuzz phase's 'unknown' item ids lie above the whole catalogue."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from cobra_scale.config import load_config, save_config
from cobra_scale.train.configs import TrainConfig
from tests.model.fixtures import tiny_dataset

TOOL = Path(__file__).resolve().parents[2] / "tools" / "load_test.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("load_test", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_test", tool)  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    return tool


def config_only_run(tmp_path: Path) -> Path:
    """A run folder with a config.yaml over a 40-item dataset (no weights: the tool reads only its config and data)."""
    data = tiny_dataset(tmp_path / "data", n_items=40)
    run = tmp_path / "run"
    save_config(load_config(TrainConfig, dotlist=[f"data={data}", f"ids={data / 'ids'}", f"out={run}"]), run)
    return run


def test_unknown_ids_are_above_the_catalogue_not_the_sampled_histories(tmp_path):
    tool, run = load_tool(), config_only_run(tmp_path)
    assert tool.catalogue_max_id(run) == 40
    # a short sample of histories can miss the largest ids (the bug the Beauty run showed)
    histories = tool.histories_of(run, 3)
    assert histories and max(max(h) for h in histories) <= 40
    assert np.all(np.asarray([i for h in histories for i in h]) <= tool.catalogue_max_id(run))


def test_bad_overrides_are_refused_in_one_line_before_anything_starts(tmp_path, capsys):
    tool, run = load_tool(), config_only_run(tmp_path)
    assert tool.main(["--run", str(run), "--set", "inference.psi"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert tool.main(["--run", str(run), "--set", "inference.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_key" in err and "Traceback" not in err
    assert tool.main(["--run", str(run), "--set", "inference.max_per_id=-1"]) == 2  # a bad value, over the run's settings
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_per_id" in err
