"""Large-K metrics by hand, confidence intervals, `cobra eval` outputs, Ray path == local path."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from cobra_scale.cli import main
from cobra_scale.eval.metrics import UserMeans, diversity, user_metrics

KS = (50, 100, 200, 500, 800)


def test_large_k_metrics_hand_computed():
    # user 0: one target at 0-based rank 70; user 1: targets at ranks 10, 300, 900 (absent);
    # user 2: no target (left out of averages).
    ranked = np.tile(np.arange(800, dtype=np.int64), (3, 1))
    ranked[2, 600:] = -1  # fewer than 800 candidates: padding
    targets = [np.array([70]), np.array([10, 300, 5000]), np.array([], dtype=np.int64)]
    sids = np.arange(800) // 100  # 8 IDs of 100 consecutive items
    values, has = user_metrics(ranked, targets, KS, sids)
    assert has.tolist() == [True, True, False]
    assert values["recall@50"][:2].tolist() == [0, pytest.approx(1 / 3)]
    assert values["recall@100"][:2].tolist() == [1, pytest.approx(1 / 3)]
    assert values["recall@500"][:2].tolist() == [1, pytest.approx(2 / 3)]
    assert values["ndcg@100"][0] == pytest.approx(1 / math.log2(72))
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert values["ndcg@800"][1] == pytest.approx((1 / math.log2(12) + 1 / math.log2(302)) / idcg3)
    assert values["ndcg@50"][1] == pytest.approx((1 / math.log2(12)) / idcg3)
    # diversity: distinct IDs among the top k (user 2 has 600 real items: IDs 0..5)
    assert values["diversity@50"].tolist() == [1, 1, 1]
    assert values["diversity@200"].tolist() == [2, 2, 2]
    assert values["diversity@800"].tolist() == [8, 8, 6]
    assert diversity(np.array([[3, -1, 3, 7]]), np.array([0, 0, 0, 5, 0, 0, 0, 5]), [4])["diversity@4"].tolist() == [1]


def test_user_means_confidence_interval():
    acc = UserMeans()
    acc.update({"r": np.array([1.0, 0.0, 1.0])}, np.array([True, True, True]))
    acc.update({"r": np.array([0.0, 9.0])}, np.array([True, False]))  # the 9 is not counted
    assert acc.count == 4 and acc.mean()["r"] == 0.5
    # s^2 = (4 * 0.25) / 3; half-width = 1.959964 * s / 2
    assert acc.half_width(0.95)["r"] == pytest.approx(1.959964 * math.sqrt(1 / 3) / 2, rel=1e-5)
    other = UserMeans()
    other.update({"r": np.array([1.0])}, np.array([True]))
    assert acc.merge(other).mean()["r"] == pytest.approx(3 / 5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.retrieve.fixtures import tiny_run

    return tiny_run(tmp_path_factory.mktemp("ev"))


@pytest.mark.slow
def test_eval_command_writes_json_table_and_figures(run, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "--run", str(run), "--out", str(index), "--shards", "2"]) == 0
    out = tmp_path / "ev"
    rc = main(["eval", "--run", str(run), "--index", str(index), "--out", str(out), "--exclude-history", "--max-users", "80",
               "ks=[5,10,40]", "modes=[cobra,no_fusion]", "grid_tau=[0.5,2]", "tau_sweep=[0.1,1,10]", "plots=true",
               "valid_users=60"])
    assert rc == 0
    res = json.loads((out / "eval_test.json").read_text())
    assert res["users"] == 80 and res["population"] == 120 and res["sampled"] and res["valid_grid_users"] == 60
    cobra = res["modes"]["cobra"]
    assert cobra["chosen_on_valid"]["tau"] in (0.5, 2.0) and len(cobra["valid_grid"]) == 2
    for name in ("recall@40", "ndcg@40", "diversity@40"):
        assert 0 <= cobra["history_not_masked"][name] and cobra["ci"][name] >= 0
    assert res["modes"]["no_fusion"]["history_masked"]["recall@40"] <= 1
    assert [p["tau"] for p in res["tau_sweep"]["points"]] == [0.1, 1.0, 10.0]
    assert res["embeddings"]["cosine"]["ids"] > 1 and res["embeddings"]["map"]["items"] > 0
    for f in ("eval_test.md", "tau_sweep_test.png", "embeddings_cosine.png", "embeddings_map.png"):
        assert (out / f).stat().st_size > 0
    table = (out / "eval_test.md").read_text()
    assert "| cobra | masked |" in table and "R@40" in table and "80 users of 120" in table
    # the chosen cobra setting, scored alone, gives the same numbers (one pass == separate passes)
    from cobra_scale.eval.batch import Setting, evaluate_local
    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.retrieve.recommender import InferenceParams
    from cobra_scale.train.data import load_examples

    rec, catalogue, tcfg, device = load_recommender(run, index)
    users = load_examples(run.parent / "data" / "splits" / "loo" / "test", catalogue, tcfg.model.max_items - 1).sample(80, 0)
    chosen = InferenceParams(mode="cobra", beams=8, tau=cobra["chosen_on_valid"]["tau"], psi=cobra["chosen_on_valid"]["psi"])
    alone = evaluate_local(rec, users.history, users.targets, [Setting("c", chosen)], (5, 10, 40), progress=False).table()["c"]
    for name, v in cobra["history_not_masked"].items():
        assert alone["metrics"][name] == pytest.approx(v, abs=1e-9)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "splits/nosuch/" in err and "not found" in err


def test_eval_config_errors(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path), "ks=[]"]) == 2
    assert "ks must be" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--workers", "-1"]) == 2
    assert main(["eval", "--run", str(tmp_path), "confidence=1.5"]) == 2
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path), "ks=[5]", "select_on=ndcg@10"]) == 2
    assert "select_on" in capsys.readouterr().err


@pytest.mark.integration
def test_ray_path_equals_local_path(run):
    """The Ray Data actor pool (in-process Ray, loopback) and the local loop agree."""
    from cobra_scale.eval.batch import Setting, evaluate_local, evaluate_ray
    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.retrieve.recommender import InferenceParams
    from cobra_scale.train.data import load_examples

    rec, catalogue, tcfg, device = load_recommender(run)
    users = load_examples(run.parent / "data" / "splits" / "loo" / "test", catalogue, tcfg.model.max_items - 1)
    settings = [Setting("cobra", InferenceParams(beams=8)), Setting("nf|masked", InferenceParams(mode="no_fusion", exclude_history=True))]
    ks = (5, 10, 20)
    local = evaluate_local(rec, users.history, users.targets, settings, ks, batch_users=32, progress=False)
    remote = evaluate_ray(str(run), None, users.history, users.targets, settings, ks, batch_users=32, workers=2, worker_cpus=0.5, progress=False,
                          keep_users=True)
    assert remote.users == local.users == 120
    # per-user values come back in user order from the actors (as the local loop's)
    mine = evaluate_local(rec, users.history, users.targets, settings, ks, batch_users=32, progress=False, keep_users=True).per_user
    assert mine.keys() == remote.per_user.keys()
    for key, v in mine.items():
        np.testing.assert_allclose(remote.per_user[key], v, atol=1e-9)
    a, b = local.table(), remote.table()
    assert a.keys() == b.keys()
    for name in a:
        assert b[name]["users"] == a[name]["users"]
        for metric, v in a[name]["metrics"].items():
            assert b[name]["metrics"][metric] == pytest.approx(v, abs=1e-9)
    import ray

    assert not ray.is_initialized()  # the in-process Ray it started is shut down


def test_grid_applies_to_every_mode_it_changes(run, tmp_path, tmp_path_factory):
    # one value is applied as given (it used to be ignored unless the cobra grid had 2+ points)
    out = tmp_path / "one"
    assert main(["eval", "--run", str(run), "--out", str(out), "--max-users", "30", "modes=[cobra,no_fusion]", "grid_beams=[3]"]) == 0
    res = json.loads((out / "eval_test.json").read_text())
    assert res["modes"]["cobra"]["chosen_on_valid"]["beams"] == 3 and "valid_grid" not in res["modes"]["cobra"]
    assert [p["pass"] for p in res["passes"]] == ["test"]  # nothing to choose: no validation pass
    # sparse_only chooses its beam count on valid; the grid's tau/psi do not multiply its points
    from tests.retrieve.fixtures import tiny_run

    sparse = tiny_run(tmp_path_factory.mktemp("sp"), "model.use_dense=false", "dedup_level=true", "inference.mode=sparse_only")
    out = tmp_path / "sparse"
    assert main(["eval", "--run", str(sparse), "--out", str(out), "--max-users", "30", "modes=[sparse_only]", "grid_beams=[2,6]",
                 "grid_tau=[0.5,2]", "ks=[2,6]", "select_on=recall@6"]) == 0
    res = json.loads((out / "eval_test.json").read_text())
    entry = res["modes"]["sparse_only"]
    assert [g["beams"] for g in entry["valid_grid"]] == [2, 6]
    best = max(entry["valid_grid"], key=lambda g: g["recall@6"])
    assert entry["chosen_on_valid"]["beams"] == best["beams"]
    assert res["passes"][0]["pass"] == "valid grid (sparse_only)"
    assert entry["history_not_masked"]["diversity@6"] <= entry["chosen_on_valid"]["beams"]  # one item per beam


def test_diversity_ids_count_another_id_table(run, tmp_path, capsys):
    """diversity@K counts the IDs of ``diversity_ids`` when given: one ID for every item gives 1."""
    from cobra_scale.data.io import write_table
    from cobra_scale.retrieve.build import load_recommender

    _, catalogue, _, _ = load_recommender(run)
    one = pa.table({"item_id": pa.array(catalogue.item_ids, pa.int64()), "sid": pa.array(np.zeros(len(catalogue), np.int64))})
    write_table(one, tmp_path / "one" / "sids.parquet")
    args = ["eval", "--run", str(run), "--split-name", "valid", "--max-users", "40"]
    assert main([*args, "--out", str(tmp_path / "own"), "ks=[5,10]"]) == 0
    assert main([*args, "--out", str(tmp_path / "flat"), "ks=[5,10]", f"diversity_ids={tmp_path / 'one'}"]) == 0
    own = json.loads((tmp_path / "own" / "eval_valid.json").read_text())["modes"]["cobra"]["history_not_masked"]
    flat = json.loads((tmp_path / "flat" / "eval_valid.json").read_text())
    assert flat["diversity_ids"] == str(tmp_path / "one")
    flat = flat["modes"]["cobra"]["history_not_masked"]
    assert flat["diversity@10"] == 1.0 < own["diversity@10"]
    assert flat["recall@10"] == own["recall@10"]  # only the count changes
    write_table(one.slice(1), tmp_path / "short" / "sids.parquet")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "ks=[5,10]", f"diversity_ids={tmp_path / 'short'}"]) == 2
    assert "have no ID" in capsys.readouterr().err


def test_prior_command_and_the_eval_grid_over_prior_weights(run, tmp_path, capsys):
    """`cobra prior` counts the run's training transitions; `cobra eval` chooses the prior weight on valid;
    weight 0 reproduces the plain COBRA figures; serving mixes the prior in only when asked."""
    import shutil

    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.retrieve.prior import TransitionPrior
    from cobra_scale.serve.engine import ModelEngine, Refusal, Settings

    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert main(["prior", "--run", str(work)]) == 0
    prior = TransitionPrior.load(work / "prior")
    assert prior.spec.window == 3 and prior.spec.sequences > 0 and prior.matrix.nnz > 0
    assert main(["prior", "--run", str(work)]) == 2
    assert "already holds a prior" in capsys.readouterr().err
    assert main(["prior", "--run", str(work), "decay=0"]) == 2
    rec, *_ = load_recommender(work)
    assert rec.prior is not None and rec.prior.spec == prior.spec
    out = tmp_path / "ev"
    assert main(["eval", "--run", str(work), "--out", str(out), "--max-users", "60", "grid_beams=[8]", "grid_prior_weight=[0,0.5,1]"]) == 0
    res = json.loads((out / "eval_test.json").read_text())["modes"]["cobra"]
    weights = [g["prior_weight"] for g in res["valid_grid"]]
    assert weights == [0, 0.5, 1]
    best = max(res["valid_grid"], key=lambda g: g["ndcg@10"])
    assert res["chosen_on_valid"]["prior_weight"] == best["prior_weight"]
    plain = tmp_path / "plain"
    assert main(["eval", "--run", str(work), "--out", str(plain), "--max-users", "60", "grid_beams=[8]", "split_name=valid"]) == 0
    zero = [g for g in res["valid_grid"] if g["prior_weight"] == 0][0]
    assert json.loads((plain / "eval_valid.json").read_text())["modes"]["cobra"]["history_not_masked"]["ndcg@10"] == pytest.approx(zero["ndcg@10"])
    assert main(["eval", "--run", str(work), "grid_prior_weight=[2]"]) == 2
    # serving: the engine attaches the run's prior; a weight > 0 without one is refused with a 503
    engine = ModelEngine(work, "cpu")
    item = int(engine.bundle.item_ids[0])
    mixed = engine.run_batch([engine.prepare({"items": [item], "k": 5}, Settings(run=str(work), prior_weight=0.5))])[0]
    assert mixed["prior_weight"] == 0.5 and mixed["items"]
    assert main(["recommend", "--run", str(work), "--k", "3", "--users", "1", "inference.prior_weight=0.5"]) == 0
    shutil.rmtree(work / "prior")
    capsys.readouterr()
    assert main(["recommend", "--run", str(work), "--k", "3", "--users", "1", "inference.prior_weight=0.5"]) == 2
    assert "cobra prior --run" in capsys.readouterr().err
    bare = ModelEngine(work, "cpu")
    with pytest.raises(Refusal) as refused:
        bare.prepare({"items": [item], "k": 5}, Settings(run=str(work), prior_weight=0.5))
    assert refused.value.status == 503 and "cobra prior" in refused.value.detail


def test_valid_unseen_scores_only_users_the_checkpoint_choice_did_not_see(tmp_path, capsys):
    from tests.retrieve.fixtures import tiny_run

    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.train.data import load_examples

    run = tiny_run(tmp_path, "eval_users=50", "seed=3")
    out = tmp_path / "ev"
    assert main(["eval", "--run", str(run), "--out", str(out), "--split-name", "valid", "valid_unseen=true",
                 "modes=[cobra]", "ks=[5,10]"]) == 0
    res = json.loads((out / "eval_valid.json").read_text())
    _, catalogue, tcfg, _ = load_recommender(run, None)
    valid = load_examples(run.parent / "data" / "splits" / "loo" / "valid", catalogue, tcfg.model.max_items - 1)
    seen = valid.sample(50, 3)  # the trainer's users: its eval_users with its seed
    unseen = valid.without(seen.user_ids)
    assert res["valid_unseen"] and res["population"] == len(valid.targets) - 50 == len(unseen.targets)
    assert not set(unseen.user_ids.tolist()) & set(seen.user_ids.tolist())
    assert sorted([*unseen.user_ids.tolist(), *seen.user_ids.tolist()]) == sorted(valid.user_ids.tolist())
    # a run validated on every user has no unseen users: a config error, not an empty evaluation
    every = tiny_run(tmp_path / "all", "eval_users=0")
    capsys.readouterr()
    assert main(["eval", "--run", str(every), "--split-name", "valid", "valid_unseen=true", "modes=[cobra]"]) == 2
    assert "none is unseen" in capsys.readouterr().err


def test_paired_difference_by_hand():
    from cobra_scale.eval.metrics import paired_difference

    a, b = np.array([0.0, 1.0, 0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    r = paired_difference(a, b, resamples=2000)
    d = b - a  # [1, 0, 1, -1, 0]: mean .2, sample sd sqrt(.7)
    assert r["users"] == 5 and r["diff"] == pytest.approx(0.2) and r["mean_a"] == pytest.approx(0.4) and r["mean_b"] == pytest.approx(0.6)
    half = 1.959964 * math.sqrt(np.var(d, ddof=1)) / math.sqrt(5)
    assert r["normal"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-5)
    assert r["bootstrap"][0] < 0.2 < r["bootstrap"][1] and -1 <= r["bootstrap"][0] and r["bootstrap"][1] <= 1
    assert (r["users_b_better"], r["users_a_better"]) == (2, 1)
    same = paired_difference(a, a + 0.1)  # a constant gap: both intervals collapse on it
    assert same["normal"] == pytest.approx([0.1, 0.1]) and same["bootstrap"] == pytest.approx([0.1, 0.1]) and same["bootstrap_p_le_0"] == 0
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])


def test_per_user_values_match_the_means(run):
    from cobra_scale.eval.batch import Setting, evaluate_local
    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.retrieve.recommender import InferenceParams
    from cobra_scale.train.data import load_examples

    rec, catalogue, tcfg, _ = load_recommender(run)
    users = load_examples(run.parent / "data" / "splits" / "loo" / "test", catalogue, tcfg.model.max_items - 1)
    res = evaluate_local(rec, users.history, users.targets, [Setting("c", InferenceParams(beams=4))], (5, 10), batch_users=16,
                         progress=False, keep_users=True)
    keep = res.per_user["has_target"]
    assert len(keep) == len(users.targets) and keep.sum() == res.table()["c"]["users"]
    for name, v in res.table()["c"]["metrics"].items():
        assert res.per_user[f"c/{name}"][keep].mean() == pytest.approx(v, abs=1e-12)
    assert evaluate_local(rec, users.history[:4], users.targets[:4], [Setting("c", InferenceParams(beams=4))], (5,), progress=False).per_user is None


def test_eval_per_user_file_and_compare(run, tmp_path, capsys):
    import pyarrow.parquet as pq

    outs = []
    for beams in (2, 8):
        out = tmp_path / f"b{beams}"
        assert main(["eval", "--run", str(run), "--out", str(out), "--max-users", "60", "--exclude-history", f"grid_beams=[{beams}]",
                     "per_user=true", "tau_sweep=[1]"]) == 0
        outs.append(out)
    table = pq.read_table(outs[0] / "per_user_test.parquet")
    res = json.loads((outs[0] / "eval_test.json").read_text())
    assert table.num_rows == 60 and res["per_user"].endswith("per_user_test.parquet")
    assert {"user_id", "has_target", "cobra/recall@10", "cobra|masked/ndcg@5"} <= set(table.column_names)
    assert not any(c.startswith("sweep|") for c in table.column_names)  # the tau sweep is left out
    has = np.asarray(table.column("has_target"))
    assert np.asarray(table.column("cobra/recall@10"))[has].mean() == pytest.approx(res["modes"]["cobra"]["history_not_masked"]["recall@10"])
    capsys.readouterr()
    report = tmp_path / "cmp.json"
    assert main(["compare", "--a", str(outs[0]), "--b", str(outs[1]), "--out", str(report), "resamples=500"]) == 0
    cmp = json.loads(report.read_text())
    both = cmp["metrics"]["recall@10 + ndcg@10"]
    r10 = cmp["metrics"]["recall@10"]
    assert cmp["users"] == int(has.sum()) and r10["mean_a"] == pytest.approx(res["modes"]["cobra"]["history_not_masked"]["recall@10"])
    assert both["diff"] == pytest.approx(r10["diff"] + cmp["metrics"]["ndcg@10"]["diff"])
    assert main(["compare", "--a", str(outs[0]), "--b", str(outs[0]), "--setting-b", "cobra|masked", "resamples=100"]) == 0
    # a run against itself: no difference, zero-width intervals
    assert main(["compare", "--a", str(outs[0]), "--b", str(outs[0]), "--out", str(report), "resamples=100"]) == 0
    assert json.loads(report.read_text())["metrics"]["recall@10"]["bootstrap"] == [0.0, 0.0]
    capsys.readouterr()
    # user mistakes: a missing setting, other users, no per-user file
    assert main(["compare", "--a", str(outs[0]), "--b", str(outs[1]), "--setting", "liger"]) == 2
    assert "no column 'liger/recall@10'" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["eval", "--run", str(run), "--out", str(other), "--max-users", "40", "grid_beams=[2]", "per_user=true"]) == 0
    capsys.readouterr()
    assert main(["compare", "--a", str(outs[0]), "--b", str(other)]) == 2
    assert "scored different users" in capsys.readouterr().err
    assert main(["compare", "--a", str(outs[0]), "--b", str(other), "intersect=true", "resamples=100"]) == 0
    capsys.readouterr()
    assert main(["compare", "--a", str(tmp_path), "--b", str(outs[1])]) == 2
    assert "per_user=true" in capsys.readouterr().err
