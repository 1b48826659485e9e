"""The offline A/B path through the CLI: synth logs -> assign -> exposures -> outcomes -> analyze."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cobra_scale.ab.exposure import ExposureLogger
from cobra_scale.ab.router import ABRouter, load_ab_config
from cobra_scale.cli import main
from cobra_scale.data.configs import SynthConfig
from cobra_scale.data.io import read_table
from cobra_scale.data.schemas import day_start
from cobra_scale.data.synth import run as synth

EXPERIMENTS = """
salt: pipeline-test
holdout: 0.05
default_model: popular
experiments:
  - name: recs
    layer: model
    start: 0
    end: 10000
    control: popular
    arms:
      - {name: popular, share: 0.5, model: popular}
      - {name: history, share: 0.5, model: history}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab_pipeline")
    synth(SynthConfig(out=str(root / "synth"), users=3000, items=300, days=3, workers=1, seed=3))
    (root / "exp.yaml").write_text(EXPERIMENTS)
    return root


def _serve_day(root, drop_treatment: float = 0.0, name: str = "exposures"):
    """Two toy 'model versions' for every user active on day 2, exposures logged at the end of day 2."""
    events = read_table(root / "synth" / "events").to_pandas()
    before = events[events["ts"] < day_start("2026-01-03")]
    popular = before["item_id"].value_counts().index[:10].to_numpy()
    recent = before.sort_values("ts").groupby("user_id")["item_id"].apply(lambda s: list(dict.fromkeys(s[::-1]))[:10])
    router = ABRouter(load_ab_config(str(root / "exp.yaml")), known_models=["popular", "history"])
    rng = np.random.default_rng(0)
    ts = day_start("2026-01-03") - 60
    with ExposureLogger(root / name, flush_rows=500) as log:
        for user, hist in recent.items():
            route = router.route(user)
            items = popular if route.model == "popular" else np.array(hist)
            if route.arm == "history" and rng.random() < drop_treatment:
                continue  # a logging bug that loses some treatment exposures
            log.log_route(route, items, np.linspace(1, 0, len(items)), ts=ts)
    return root / name


def test_assign_cli_agrees_with_router(world, tmp_path):
    users = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1, 2, 3, 40, 50, None], pa.int64())}), users)
    assert main(["ab", "assign", "--experiments", str(world / "exp.yaml"), "--users", str(users), "--out", str(tmp_path / "a.parquet")]) == 0
    a = pq.read_table(tmp_path / "a.parquet").to_pylist()
    router = ABRouter(load_ab_config(str(world / "exp.yaml")))
    for row in a:
        r = router.route(row["user_id"])
        assert (row["arm"], row["model"], row["experiment"]) == (r.arm, r.model, r.experiment)
    assert a[-1]["arm"] == "default" and a[-1]["bucket"] == -1


def test_reshare_cli(world, tmp_path, capsys):
    out = tmp_path / "new.yaml"
    assert main(["ab", "reshare", "--experiments", str(world / "exp.yaml"), "--experiment", "recs", "--out", str(out), "shares.popular=0.4", "shares.history=0.6"]) == 0
    assert "buckets_moved: 1000" in capsys.readouterr().out
    arms = load_ab_config(str(out)).experiment("recs").arms
    assert [a.ranges for a in arms] == [[[0, 4000]], [[4000, 10000]]]
    assert main(["ab", "reshare", "--experiments", str(world / "exp.yaml"), "--experiment", "recs", "--out", str(out), "shares.populr=1.0"]) == 2
    assert "no arm(s) populr" in capsys.readouterr().err


def test_offline_ab_end_to_end(world, capsys):
    exposures = _serve_day(world)
    outcomes = world / "outcomes.parquet"
    assert main(["ab", "outcomes", "--exposures", str(exposures), "--events", str(world / "synth" / "events"), "--out", str(outcomes)]) == 0
    table = pq.read_table(outcomes)
    assert pc.all(pc.equal(table.column("window_start"), day_start("2026-01-03"))).as_py()
    report = world / "report"
    assert main(["ab", "analyze", "--outcomes", str(outcomes), "--experiments", str(world / "exp.yaml"), "--out", str(report), "--bootstrap", "500"]) == 0
    captured = capsys.readouterr()
    assert "MISMATCH" not in captured.err
    md = (report / "report.md").read_text()
    assert "| popular |" in md and "| history | conversion |" in md and "SAMPLE RATIO MISMATCH" not in md
    assert (report / "lift.png").stat().st_size > 5000
    res = json.loads((report / "analysis.json").read_text())["experiments"]["recs"]
    assert res["users"] == table.num_rows and not res["srm"]["mismatch"]
    assert set(res["vs_control"]["history"]) == {"conversion", "arpu"}


def test_srm_warns_loudly_on_a_broken_split(world, capsys):
    exposures = _serve_day(world, drop_treatment=0.3, name="exposures_skewed")
    outcomes = world / "outcomes_skewed.parquet"
    assert main(["ab", "outcomes", "--exposures", str(exposures), "--events", str(world / "synth" / "events"), "--out", str(outcomes)]) == 0
    assert main(["ab", "analyze", "--outcomes", str(outcomes), "--experiments", str(world / "exp.yaml"), "--out", str(world / "skewed"), "--bootstrap", "0"]) == 0
    captured = capsys.readouterr()
    assert "SAMPLE RATIO MISMATCH" in captured.err and "MISMATCH" in captured.out
    assert (world / "skewed" / "report.md").read_text().startswith("# A/B test report\n\n> **WARNING — SAMPLE RATIO MISMATCH")
