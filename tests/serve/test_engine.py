"""The model side without Ray: bundle, request checks, batched answers equal direct Recommender calls."""

import json
import os

import numpy as np
import pytest
import torch

from cobra_scale.retrieve.recommender import InferenceParams
from cobra_scale.serve.bundle import ensure_bundle, load_bundle
from cobra_scale.serve.engine import ModelEngine, Refusal, Settings
from cobra_scale.serve.service import HistoryTable
from cobra_scale.serve.shards import LocalShard, ShardedIndex, load_shard

pytestmark = pytest.mark.slow  # trains a tiny model once per session (~10 s)


@pytest.fixture(scope="module")
def engine(tiny_run):
    return ModelEngine(tiny_run, "cpu")


def settings(run, **kw):
    return Settings(run=str(run), beams=8, **kw)


def test_bundle_is_built_once_and_matches_the_catalogue(tiny_run, engine):
    folder = ensure_bundle(tiny_run)
    stamp = os.stat(folder / "items.safetensors").st_mtime_ns
    assert ensure_bundle(tiny_run) == folder and os.stat(folder / "items.safetensors").st_mtime_ns == stamp  # same weights: no rebuild
    meta = json.loads((folder / "bundle.json").read_text())
    bundle = load_bundle(folder)
    assert meta["items"] == len(bundle) == 40 and bundle.item_ids.tolist() == list(range(1, 41))
    part = load_bundle(folder, rows=(10, 20))
    torch.testing.assert_close(part.vectors, bundle.vectors[10:20])
    assert torch.equal(part.codes, bundle.codes[10:20]) and part.item_ids.tolist() == list(range(11, 21))
    torch.testing.assert_close(engine.recommender.vectors, bundle.vectors)


def test_prepare_refuses_bad_content(tiny_run, engine):
    s = settings(tiny_run)
    with pytest.raises(Refusal, match="unknown item id"):
        engine.prepare({"items": [1, 999, -3], "k": 5}, s)
    with pytest.raises(Refusal, match="at most 20"):
        engine.prepare({"items": [1] * 21, "k": 5}, s)
    with pytest.raises(Refusal, match="not available"):
        engine.prepare({"items": [1], "mode": "sparse_only"}, s)
    # a stored history: cut to the window, unknown items dropped
    p = engine.prepare({"items": [999, *range(1, 31)], "truncate": True}, s)
    assert len(p.history) == 20 and engine.bundle.item_ids[p.history].tolist() == list(range(11, 31))
    p = engine.prepare({"items": [3, 4], "k": 7, "tau": 2.5, "mode": "no_fusion"}, s)
    assert p.params == InferenceParams("no_fusion", 8, 2.5, 20.0, s.normalize, False) and p.k == 7


def test_batch_with_mixed_parameters_equals_direct_calls(tiny_run, engine):
    s = settings(tiny_run)
    requests = [
        {"items": [3, 4, 5], "k": 5},
        {"items": [10], "k": 3, "tau": 3.0},
        {"items": [7, 8], "k": 8},
        {"items": [20, 21, 22, 23], "k": 4, "mode": "no_fusion"},
        {"items": [3, 4, 5], "k": 5, "exclude_history": True},
    ]
    prepared = [engine.prepare(r, s) for r in requests]
    answers = engine.run_batch(prepared)
    for req, p, ans in zip(requests, prepared, answers):
        h = torch.full((1, engine.max_history), -1, dtype=torch.long)
        h[0, -len(p.history):] = torch.from_numpy(p.history)
        items, scores = engine.recommender.recommend(h, p.k, p.params)
        keep = items[0] >= 0
        assert [a["item_id"] for a in ans["items"]] == engine.bundle.item_ids[items[0][keep].numpy()].tolist()
        np.testing.assert_allclose([a["score"] for a in ans["items"]], scores[0][keep].numpy(), rtol=1e-5, atol=1e-6)
        assert len(ans["items"]) <= req["k"] and ans["history_length"] == len(req["items"])
        assert all(a["sid"] == engine.bundle.codes[engine.bundle.index_of(np.array([a["item_id"]]))[0]].tolist() for a in ans["items"])
    assert not {3, 4, 5} & {a["item_id"] for a in answers[4]["items"]}  # excluded history
    assert answers[1]["tau"] == 3.0 and answers[3]["mode"] == "no_fusion"


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_engine_answers_like_the_local_index(tiny_run, engine, num_shards):
    def factory(bundle):  # what the shard deployments do, in process
        return ShardedIndex([LocalShard(load_shard(bundle.folder, i, num_shards)[0]) for i in range(num_shards)])

    sharded = ModelEngine(tiny_run, "cpu", factory)
    s = settings(tiny_run)
    reqs = [{"items": [5, 6, 7], "k": 10}, {"items": [30], "k": 6, "mode": "no_fusion"}, {"items": [1, 2], "k": 10, "exclude_history": True}]
    for a, b in zip(engine.run_batch([engine.prepare(r, s) for r in reqs]), sharded.run_batch([sharded.prepare(r, s) for r in reqs])):
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        np.testing.assert_allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], rtol=1e-5, atol=1e-6)


def test_history_table_from_a_split(tiny_data):
    table = HistoryTable.load(tiny_data / "splits" / "loo" / "test")
    assert len(table) == 120
    import pyarrow.parquet as pq

    rows = pq.read_table(tiny_data / "splits" / "loo" / "test").to_pylist()
    for row in rows[:20]:
        assert table.lookup(row["user_id"]) == row["history"]
    assert table.lookup(10_000) is None


def test_max_per_id_caps_local_and_sharded_engines_alike(tiny_run):
    """Settings.max_per_id reaches the index, local or sharded, and answers as `cobra eval`'s Recommender with that cap."""
    from cobra_scale.retrieve.recommender import InferenceParams, Recommender
    from cobra_scale.serve.bundle import load_bundle

    def factory(bundle):
        return ShardedIndex([LocalShard(load_shard(bundle.folder, i, 2)[0]) for i in range(2)])

    local, sharded = ModelEngine(tiny_run, "cpu"), ModelEngine(tiny_run, "cpu", factory)
    bundle = load_bundle(ensure_bundle(tiny_run))
    reference = Recommender(local.recommender.model, bundle.codes, bundle.vectors, max_per_id=2)
    assert reference.index.max_bucket > 2  # the cap cuts some ID
    s = settings(tiny_run, max_per_id=2)
    reqs = [{"items": [5, 6, 7], "k": 10}, {"items": [30, 2], "k": 8}]
    uncapped = local.run_batch([local.prepare(r, settings(tiny_run)) for r in reqs])
    for engine in (local, sharded):
        engine.set_max_per_id(s.max_per_id)
    history = torch.full((2, local.max_history), -1, dtype=torch.long)
    for row, r in enumerate(reqs):
        idx = torch.from_numpy(bundle.index_of(np.asarray(r["items"])))
        history[row, local.max_history - len(idx):] = idx
    want_items, want_scores = reference.recommend(history, 10, InferenceParams(beams=8))
    for engine in (local, sharded):
        got = engine.run_batch([engine.prepare(r, s) for r in reqs])
        for row, (res, k) in enumerate(zip(got, (10, 8))):
            keep = torch.isfinite(want_scores[row, :k])
            assert [x["item_id"] for x in res["items"]] == bundle.item_ids[want_items[row, :k][keep].numpy()].tolist()
            np.testing.assert_allclose([x["score"] for x in res["items"]], want_scores[row, :k][keep].numpy(), rtol=1e-5, atol=1e-6)
    assert [r["items"] for r in uncapped] != [r["items"] for r in local.run_batch([local.prepare(r, s) for r in reqs])]  # the cap matters here


def test_the_app_serves_the_runs_inference_settings_unless_told_otherwise(tiny_run):
    from cobra_scale.config import load_config
    from cobra_scale.errors import ConfigError
    from cobra_scale.serve.app import base_settings
    from cobra_scale.serve.configs import ServeConfig
    from cobra_scale.train.configs import TrainConfig

    own = load_config(TrainConfig, tiny_run / "config.yaml").inference
    assert own.beams == 8  # the fixture's run (InferenceConfig's default is 20)
    base = base_settings(ServeConfig(run=str(tiny_run)), tiny_run)
    assert (base["beams"], base["psi"], base["tau"], base["normalize"]) == (own.beams, own.psi, own.tau, own.normalize)
    cfg = load_config(ServeConfig, dotlist=[f"run={tiny_run}", "inference.beams=12", "inference.psi=33"])
    base = base_settings(cfg, tiny_run)
    assert (base["beams"], base["psi"], base["tau"]) == (12, 33, own.tau)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ServeConfig, dotlist=[f"run={tiny_run}", "inference.beam=12"])
    with pytest.raises(ConfigError, match="max_per_id"):
        base_settings(load_config(ServeConfig, dotlist=[f"run={tiny_run}", "inference.max_per_id=-1"]), tiny_run)


def test_the_apps_default_max_per_id_is_the_runs(tiny_run):
    from cobra_scale.config import load_config, save_config
    from cobra_scale.serve.app import base_settings
    from cobra_scale.serve.configs import ServeConfig
    from cobra_scale.train.configs import TrainConfig

    run_max = load_config(TrainConfig, tiny_run / "config.yaml").inference.max_per_id
    assert base_settings(ServeConfig(run=str(tiny_run)), tiny_run)["max_per_id"] == run_max
    cfg = load_config(ServeConfig, dotlist=[f"run={tiny_run}", "inference.max_per_id=7"])
    assert base_settings(cfg, tiny_run)["max_per_id"] == 7
    with pytest.raises(Exception, match="max_per_id"):
        Settings(run=str(tiny_run), max_per_id=-1)
