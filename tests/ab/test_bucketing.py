"""Bucketing: uniform, independent across layers, stable across processes; config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from cobra_scale.ab.bucketing import HOLDOUT_LAYER, bucket_of, buckets_of, canonical_user_id
from cobra_scale.ab.router import ABRouter, ab_config_from_dict
from cobra_scale.errors import ConfigError
from tests.ab.helpers import two_arm_dict, two_layer_config

N_IDS = 100_000


def test_pinned_buckets():
    # The hash is part of the on-disk contract: a change here reassigns every live user.
    assert [bucket_of(k, "cobra-ab", "main", 10_000) for k in ["0", "42", "user-7", "9223372036854775807"]] == [709, 4478, 8060, 8856]
    assert bucket_of("42", "cobra-ab", HOLDOUT_LAYER, 10_000) == 7868


@pytest.mark.parametrize("kind", ["sequential ints", "strings"])
def test_buckets_uniform_chi_square(kind):
    keys = [str(i) for i in range(N_IDS)] if kind == "sequential ints" else [f"u{i:08x}@shop" for i in range(N_IDS)]
    b = buckets_of(keys, "salt-1", "main", 10_000)
    assert b.min() >= 0 and b.max() < 10_000
    counts = np.bincount(b, minlength=10_000)  # 10 expected per bucket
    chi2, p = sps.chisquare(counts)
    assert p > 1e-3, (chi2, p)
    # coarse view: 100 groups of 100 buckets (1000 expected each)
    _, p_coarse = sps.chisquare(counts.reshape(100, 100).sum(1))
    assert p_coarse > 1e-3


def test_layers_are_independent():
    keys = [str(i) for i in range(N_IDS)]
    a = buckets_of(keys, "salt-1", "model", 10_000) // 1000  # 10 x 10 grid of bucket deciles
    b = buckets_of(keys, "salt-1", "inference", 10_000) // 1000
    table = np.zeros((10, 10))
    np.add.at(table, (a, b), 1)
    chi2, p, _, _ = sps.chi2_contingency(table)
    assert p > 1e-3, (chi2, p)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    # and routed arms: inside each model arm, the tau arms keep their 25% shares
    router = ABRouter(two_layer_config())
    routes = [router.route(i) for i in range(20_000)]
    grid = np.zeros((2, 4))
    for r in routes:
        grid[["control", "treatment"].index(r.arms["fusion"]), int(r.arms["tau"][-1])] += 1
    _, p_arms, _, _ = sps.chi2_contingency(grid)
    assert p_arms > 1e-3


@pytest.mark.integration
def test_stable_across_processes():
    """Another interpreter (different PYTHONHASHSEED) routes every user identically."""
    cfg = two_arm_dict(holdout=0.1, end=5000)
    ids = list(range(500)) + [f"user-{i}" for i in range(500)]
    code = (
        "import json, sys\n"
        "from cobra_scale.ab.router import ABRouter\n"
        "cfg, ids = json.loads(sys.stdin.read())\n"
        "r = ABRouter(cfg)\n"
        "print(json.dumps([[x.arm, x.model, x.experiment] for x in map(r.route, ids)]))\n"
    )
    mine = [[x.arm, x.model, x.experiment] for x in map(ABRouter(cfg).route, ids)]
    for seed in ("1", "2"):
        res = subprocess.run([sys.executable, "-c", code], input=json.dumps([cfg, ids]), capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert json.loads(res.stdout) == mine
    assert {m[0] for m in mine} == {"control", "treatment", "default", "holdout"}


def test_canonical_ids():
    assert canonical_user_id(42) == canonical_user_id("42") == canonical_user_id(np.int64(42)) == canonical_user_id(42.0) == " 42 ".strip()
    for absent in (None, "", "   ", float("nan"), True, 1.5, [1], "x" * 1000):
        assert canonical_user_id(absent) is None


def _bad(mutate):
    d = two_arm_dict()
    mutate(d)
    with pytest.raises(ConfigError) as exc:
        ab_config_from_dict(d)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_config_errors_are_one_line():
    assert "sum to 0.9" in _bad(lambda d: d["experiments"][0]["arms"][1].update(share=0.4))
    assert "control arm 'ctl'" in _bad(lambda d: d["experiments"][0].update(control="ctl"))

    def overlap(d):
        d["experiments"].append({**d["experiments"][0], "name": "other", "start": 900, "end": 1500})

    assert "overlap in layer 'model'" in _bad(overlap)

    def other_layer(d):  # the same range in another layer is fine ...
        d["experiments"].append({**d["experiments"][0], "name": "other", "layer": "ui", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]})

    ab_config_from_dict((lambda d: (other_layer(d), d)[1])(two_arm_dict()))

    def model_in_two_layers(d):  # ... but only one layer may choose the model
        other_layer(d)
        d["experiments"][1]["arms"][0]["model"] = "x"

    assert "only one layer" in _bad(model_in_two_layers)
    assert "exceeds the 10000 buckets" in _bad(lambda d: d["experiments"][0].update(end=20_000))
    assert "reserved" in _bad(lambda d: d["experiments"][0]["arms"][0].update(name="default"))
    assert "duplicate arm" in _bad(lambda d: d["experiments"][0]["arms"][1].update(name="control"))
    assert "at least two arms" in _bad(lambda d: d["experiments"][0].update(arms=d["experiments"][0]["arms"][:1]))
    assert "not in 'ArmConfig'" in _bad(lambda d: d["experiments"][0]["arms"][0].update(shares=0.5))

    def ranges_overlap(d):
        d["experiments"][0]["arms"][0].update(share=None, ranges=[[0, 600]])
        d["experiments"][0]["arms"][1].update(share=None, ranges=[[500, 1000]])

    assert "overlap" in _bad(ranges_overlap)


def test_cli_config_error_exit_2(tmp_path, capsys):
    from cobra_scale.cli import main

    bad = tmp_path / "exp.yaml"
    bad.write_text("salt: s\nexperiments:\n  - {name: e, start: 0, end: 100, arms: [{name: a, share: 0.7}, {name: b, share: 0.7}]}\n")
    users = tmp_path / "users.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [1, 2]}), users)
    rc = main(["ab", "assign", "--experiments", str(bad), "--users", str(users), "--out", str(tmp_path / "a.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "sum to 1.4" in err
