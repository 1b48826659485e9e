"""The model's ID-free dense vector at inference (beyond the paper).

``free_query_weight``: each beam's query inside its ID mixes the ID-conditioned vector with the ID-free one.
``free_mix_weight``: the ID-free vector's own ranking over the catalogue is mixed into BeamFusion's distribution.
"""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cobra_scale.cli import main
from cobra_scale.errors import ConfigError
from cobra_scale.model.beam import Beams, PrefixMasks, beam_search
from cobra_scale.retrieve.recommender import InferenceParams, Recommender
from cobra_scale.model.config import CobraConfig
from cobra_scale.train.configs import EvalConfig, InferenceConfig, TrainConfig
from tests.model.test_cobra import catalogue, tiny_model


def test_beams_query_by_hand():
    dense = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)  # (B=1, M=2, d=2)
    free = torch.tensor([[0.6, 0.8]])
    beams = Beams(torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(1, 2), dense, torch.zeros(1, 2, dtype=torch.long), free)
    assert torch.equal(beams.query(0.0), dense)
    assert torch.allclose(beams.query(1.0), free[:, None, :].expand(1, 2, 2))
    # w = .5: normalize(.5 (1, 0) + .5 (.6, .8)) = (.8, .4) / |(.8, .4)|
    want = torch.tensor([0.8, 0.4]) / torch.tensor([0.8, 0.4]).norm()
    assert torch.allclose(beams.query(0.5)[0, 0], want)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beams.query(1.5)
    with pytest.raises(ValueError, match="free_query=True"):
        Beams(beams.codes, beams.scores, dense, beams.sids).query(0.5)


def _rec(shared_ids: bool = False, **kw):
    model = tiny_model(**kw)
    tokens, mask, codes = catalogue()
    if shared_ids:  # two IDs of six items each, so that the ranking inside an ID is tested
        codes = torch.stack([torch.arange(12) % 2, torch.zeros(12, dtype=torch.long)], 1)
    return Recommender(model, codes, model.encode_items(tokens, mask)), codes


def test_free_vector_is_the_id_free_prediction_and_weight_zero_is_cobra():
    rec, codes = _rec(shared_ids=True, history_dense_weight=1.0)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    c, v, valid = rec._history_inputs(hist)
    beams = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 4, last_items=hist, free_query=True)
    h, _, _ = rec.model.start(c, v, valid)
    free = rec.model.dense_prediction(rec.model.with_successor(h, hist, dense=True))  # the dense_only query of this model
    assert torch.allclose(beams.free, free, atol=1e-6)
    assert torch.allclose(beams.query(1.0), free[:, None, :].expand_as(beams.dense), atol=1e-6)
    plain = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 4, last_items=hist)
    assert plain.free is None and torch.equal(plain.dense, beams.dense) and torch.equal(plain.sids, beams.sids)
    # weight 0 is the paper's COBRA; weight 1 ranks inside each beam's ID by the ID-free vector
    items, _ = rec.recommend(hist, 5, InferenceParams("cobra", 1, psi=50.0, free_query_weight=1.0))
    top_id = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 1, last_items=hist).sids[:, 0]
    for u in range(2):  # one beam: the top items are that ID's items in the order of their cosine with the ID-free vector
        in_id = torch.nonzero(rec.sids == top_id[u]).view(-1)
        order = in_id[torch.argsort(F.normalize(rec.vectors[in_id], dim=-1) @ free[u], descending=True)]
        got = items[u][items[u] >= 0]
        assert len(got) == 5 and got.tolist() == order[:5].tolist()
    paper, _ = rec.recommend(hist, 5, InferenceParams("cobra", 1, psi=50.0))
    assert not torch.equal(paper, items)  # the ID-conditioned vector orders the same IDs differently
    # recommend_many shares the beam search across weights and equals separate calls
    settings = [InferenceParams("cobra", 4, free_query_weight=w) for w in (0.0, 0.5, 1.0)]
    for params, (got, _) in zip(settings, rec.recommend_many(hist, 5, settings)):
        assert torch.equal(got, rec.recommend(hist, 5, params)[0])


def test_free_vector_with_successor_rows_is_what_the_history_dense_loss_trains():
    # the loss reads position 0 of the next item with the code heads' successor rows (successor_context), not the dense
    # head's (successor_context_dense), so v_free must too
    rec, codes = _rec(history_dense_weight=1.0, successor_embedding=True, catalogue_items=12, successor_context=2, successor_context_dense=1)
    torch.nn.init.normal_(rec.model.succ_emb.weight, std=0.5)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    c, v, valid = rec._history_inputs(hist)
    beams = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 4, last_items=hist, free_query=True)
    h, _, _ = rec.model.start(c, v, valid)
    want = F.normalize(rec.model.dense_head(h + rec.model.successor_shift(hist)), dim=-1)
    assert torch.allclose(beams.free, want, atol=1e-6)
    other = F.normalize(rec.model.dense_head(h + rec.model.successor_shift(hist, dense=True)), dim=-1)
    assert not torch.allclose(beams.free, other, atol=1e-4)  # the two shifts differ here, so the test tells them apart


def test_free_query_refusals():
    rec, _ = _rec()  # trained without history_dense_weight: its ID-free vector is untrained
    hist = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="history_dense_weight"):
        rec.recommend(hist, 3, InferenceParams("cobra", 4, free_query_weight=0.5))
    rec, _ = _rec(history_dense_weight=1.0)
    with pytest.raises(ValueError, match="mode cobra"):
        rec.recommend(hist, 3, InferenceParams("no_fusion", 4, free_query_weight=0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rec.recommend_many(hist, 3, [InferenceParams("cobra", 4, free_query_weight=-0.1)])
    with pytest.raises(ConfigError, match="free_query_weight"):
        InferenceConfig(free_query_weight=2.0)
    with pytest.raises(ConfigError, match="grid_free_query_weight"):
        EvalConfig(run="r", grid_free_query_weight=[0, "x"])
    with pytest.raises(ConfigError, match="mode cobra"):
        InferenceConfig(mode="dense_only", free_query_weight=0.5)
    with pytest.raises(ConfigError, match="history_dense_weight"):
        TrainConfig(data="d", ids="i", out="o", inference=InferenceConfig(free_query_weight=0.5))
    TrainConfig(data="d", ids="i", out="o", inference=InferenceConfig(free_query_weight=0.5), model=CobraConfig(history_dense_weight=1.0))
    # the Ray actors rebuild the settings from dicts
    p = InferenceParams("cobra", 4, free_query_weight=0.25)
    assert InferenceParams(**asdict(p)) == p


def test_free_mix_by_hand():
    """(1 - λ) p_BeamFusion + λ softmax(ψ cos(v_free, ·)) over v_free's top C items, every item once."""
    rec, codes = _rec(shared_ids=True, history_dense_weight=1.0)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    lam, psi, k = 0.3, 20.0, 5
    c, v, valid = rec._history_inputs(hist)
    beams = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 2, last_items=hist, free_query=True)
    items, scores = rec.recommend(hist, k, InferenceParams("cobra", 2, psi=psi, free_mix_weight=lam))
    for u in range(2):
        want = torch.zeros(len(codes), dtype=torch.float64)  # BeamFusion per beam: P(ID) x softmax over the ID's items
        beam_p = torch.softmax(beams.scores[u].double(), 0)
        for m in range(2):
            in_id = torch.nonzero(rec.sids == beams.sids[u, m]).view(-1)
            cos = F.normalize(rec.vectors[in_id], dim=-1) @ F.normalize(beams.dense[u, m], dim=-1)
            want[in_id] += (1 - lam) * beam_p[m] * torch.softmax(psi * cos.double(), 0)
        free_cos = F.normalize(rec.vectors, dim=-1) @ F.normalize(beams.free[u], dim=-1)
        top_cos, top = free_cos.double().topk(k)  # C = the list's k
        want[top] += lam * torch.softmax(psi * top_cos, 0)
        w_scores, w_items = want.topk(k)
        assert items[u].tolist() == w_items.tolist()
        assert torch.allclose(scores[u].double(), w_scores, atol=1e-5)
        assert torch.isclose(want.sum(), torch.tensor(1.0, dtype=torch.float64))  # a mixture of two distributions


def test_free_mix_weight_zero_is_cobra_and_one_is_the_id_free_ranking():
    rec, codes = _rec(shared_ids=True, history_dense_weight=1.0)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    paper = rec.recommend(hist, 5, InferenceParams("cobra", 2, psi=20.0))
    zero = rec.recommend(hist, 5, InferenceParams("cobra", 2, psi=20.0, free_mix_weight=0.0))
    assert torch.equal(paper[0], zero[0]) and torch.equal(paper[1], zero[1])
    c, v, valid = rec._history_inputs(hist)
    beams = beam_search(rec.model, c, v, valid, PrefixMasks(codes.numpy(), rec.model.cfg.codes), 2, last_items=hist, free_query=True)
    nearest, _ = rec.index.search(beams.free, 5)
    one, _ = rec.recommend(hist, 5, InferenceParams("cobra", 2, psi=20.0, free_mix_weight=1.0))
    assert torch.equal(one, nearest)  # λ 1: BeamFusion's share is 0, the ID-free vector's nearest items in order
    mixed, _ = rec.recommend(hist, 5, InferenceParams("cobra", 2, psi=20.0, free_mix_weight=0.3))
    assert not torch.equal(mixed, paper[0]) and not torch.equal(mixed, one)  # the tiny case tells the three apart
    # more candidates from the free ranking: C larger than k still gives k items, each once
    wide, _ = rec.recommend(hist, 5, InferenceParams("cobra", 2, psi=20.0, free_mix_weight=0.3, free_mix_candidates=12))
    assert all(len(set(r.tolist())) == 5 for r in wide)


def test_free_mix_masks_history_and_recommend_many_equals_separate_calls():
    rec, codes = _rec(shared_ids=True, history_dense_weight=1.0)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    settings = [InferenceParams("cobra", 2, psi=20.0, free_mix_weight=w, exclude_history=ex, free_query_weight=fq)
                for w in (0.0, 0.3, 1.0) for ex in (False, True) for fq in (0.0, 0.5)]
    for params, (got, got_s) in zip(settings, rec.recommend_many(hist, 5, settings)):
        want, want_s = rec.recommend(hist, 5, params)
        assert torch.equal(got, want) and torch.allclose(got_s, want_s)
        if params.exclude_history:
            for u in range(2):
                assert not set(got[u].tolist()) & set(hist[u][hist[u] >= 0].tolist())
                assert (got[u] >= 0).all()  # the free ranking looked past the history items it dropped


def test_free_mix_refusals():
    rec, _ = _rec()
    hist = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="free_mix_weight > 0 needs .*history_dense_weight"):
        rec.recommend(hist, 3, InferenceParams("cobra", 4, free_mix_weight=0.5))
    rec, _ = _rec(history_dense_weight=1.0)
    with pytest.raises(ValueError, match="free_mix_weight applies to mode cobra"):
        rec.recommend(hist, 3, InferenceParams("dense_only", 4, free_mix_weight=0.5))
    with pytest.raises(ValueError, match=r"free_mix_weight must lie in \[0, 1\]"):
        rec.recommend_many(hist, 3, [InferenceParams("cobra", 4, free_mix_weight=1.5)])
    with pytest.raises(ValueError, match="free_mix_candidates"):
        rec.recommend(hist, 3, InferenceParams("cobra", 4, free_mix_weight=0.5, free_mix_candidates=-1))
    with pytest.raises(ConfigError, match="free_mix_weight"):
        InferenceConfig(free_mix_weight=-0.5)
    with pytest.raises(ConfigError, match="free_mix_candidates"):
        InferenceConfig(free_mix_candidates=-1)
    with pytest.raises(ConfigError, match="mode cobra"):
        InferenceConfig(mode="no_fusion", free_mix_weight=0.5)
    with pytest.raises(ConfigError, match="grid_free_mix_weight"):
        EvalConfig(run="r", grid_free_mix_weight=[0, 2])
    with pytest.raises(ConfigError, match="free_mix_weight 0.5 needs"):
        TrainConfig(data="d", ids="i", out="o", inference=InferenceConfig(free_mix_weight=0.5))
    p = InferenceParams("cobra", 4, free_mix_weight=0.25, free_mix_candidates=100)
    assert InferenceParams(**asdict(p)) == p


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory):
    from tests.retrieve.fixtures import tiny_run

    return tiny_run(tmp_path_factory.mktemp("fq"), "model.history_dense_weight=1")


def _eval_grid(run, out, name: str) -> dict:
    """``cobra eval`` over ``name`` = [0, 0.5, 1]: the grid's rows, its choice by recall@40, the weight reaching the recommender."""
    assert main(["eval", "--run", str(run), "--out", str(out), "--max-users", "60", "grid_beams=[8]",
                 f"grid_{name}=[0,0.5,1]", "ks=[5,10,40]", "select_on=recall@40"]) == 0
    res = json.loads((out / "eval_test.json").read_text())["modes"]["cobra"]
    assert [g[name] for g in res["valid_grid"]] == [0, 0.5, 1]
    best = max(res["valid_grid"], key=lambda g: g["recall@40"])
    assert res["chosen_on_valid"][name] == best[name]
    # the weight reaches the recommender: the grid's rows are not all the same
    assert len({(g["recall@40"], g["ndcg@40"], g["ndcg@10"]) for g in res["valid_grid"]}) > 1
    return res


def test_eval_grid_over_free_query_weights(hd_run, tmp_path, capsys):
    res = _eval_grid(hd_run, tmp_path / "ev", "free_query_weight")
    # weight 0 of the grid is the plain run
    plain = tmp_path / "plain"
    assert main(["eval", "--run", str(hd_run), "--out", str(plain), "--max-users", "60", "grid_beams=[8]", "ks=[5,10,40]", "split_name=valid"]) == 0
    zero = [g for g in res["valid_grid"] if g["free_query_weight"] == 0][0]
    got = json.loads((plain / "eval_valid.json").read_text())["modes"]["cobra"]["history_not_masked"]["recall@40"]
    assert np.isclose(got, zero["recall@40"])
    # serving: the deployment's user_config sets the weight; the answer says which was used
    from cobra_scale.serve.engine import ModelEngine, Settings

    engine = ModelEngine(hd_run, "cpu")
    item = int(engine.bundle.item_ids[0])
    answer = engine.run_batch([engine.prepare({"items": [item], "k": 5}, Settings(run=str(hd_run), free_query_weight=0.5))])[0]
    assert answer["free_query_weight"] == 0.5 and answer["items"]
    paper = engine.run_batch([engine.prepare({"items": [item], "k": 5}, Settings(run=str(hd_run)))])[0]
    assert paper["free_query_weight"] == 0.0
    assert main(["recommend", "--run", str(hd_run), "--k", "3", "--users", "1", "inference.free_query_weight=0.5"]) == 0


def test_eval_grid_over_free_mix_weights_and_serving(hd_run, tmp_path, capsys):
    _eval_grid(hd_run, tmp_path / "ev", "free_mix_weight")
    from cobra_scale.serve.engine import ModelEngine, Settings

    engine = ModelEngine(hd_run, "cpu")
    item = int(engine.bundle.item_ids[0])
    answer = engine.run_batch([engine.prepare({"items": [item], "k": 5}, Settings(run=str(hd_run), free_mix_weight=0.5))])[0]
    assert answer["free_mix_weight"] == 0.5 and len(answer["items"]) == 5
    assert main(["recommend", "--run", str(hd_run), "--k", "3", "--users", "1", "inference.free_mix_weight=0.5"]) == 0


def test_eval_refuses_free_query_on_a_run_without_the_head(tmp_path, capsys):
    from tests.retrieve.fixtures import tiny_run

    run = tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "grid_free_query_weight=[0,0.5]"]) == 2
    assert "history_dense_weight" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run), "--k", "3", "--users", "1", "inference.free_query_weight=0.5"]) == 2
    assert "history_dense_weight" in capsys.readouterr().err
    from cobra_scale.serve.engine import ModelEngine, Refusal, Settings

    engine = ModelEngine(run, "cpu")
    with pytest.raises(Refusal) as refused:
        engine.prepare({"items": [int(engine.bundle.item_ids[0])], "k": 5}, Settings(run=str(run), free_query_weight=0.5))
    assert refused.value.status == 503 and "history_dense_weight" in refused.value.detail
    # `cobra serve` refuses such a deployment before anything starts
    from cobra_scale.serve.configs import ServeConfig
    from cobra_scale.serve.run_serve import _check

    with pytest.raises(ConfigError, match="history_dense_weight"):
        _check(ServeConfig(run=str(run), user_config={"free_query_weight": 0.5}))
    with pytest.raises(ConfigError, match="free_mix_weight 0.5 needs"):
        _check(ServeConfig(run=str(run), user_config={"free_mix_weight": 0.5}))
    with pytest.raises(Refusal) as refused:
        engine.prepare({"items": [int(engine.bundle.item_ids[0])], "k": 5}, Settings(run=str(run), free_mix_weight=0.5))
    assert refused.value.status == 503 and "free_mix_weight" in refused.value.detail
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "grid_free_mix_weight=[0,0.5]"]) == 2
    assert "free_mix_weight" in capsys.readouterr().err
    _check(ServeConfig(run=str(run)))
