"""Training end to end on a tiny dataset: it learns, checkpoints round-trip, resume continues."""

import json

import pytest

from cobra_scale.cli import main
from cobra_scale.config import load_config
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import load_run, make_recommender, run
from tests.model.fixtures import tiny_dataset

SMALL = [
    "model.d_model=32", "model.encoder_dim=32", "model.decoder_heads=2", "model.encoder_heads=2", "model.text_tokens=12",
    "batch_size=32", "lr=3e-3", "warmup_steps=5", "inference.beams=8", "init_embeddings=false",
]


def config(root, out, *extra):
    return load_config(TrainConfig, dotlist=[f"data={root}", f"ids={root / 'ids'}", f"out={out}", *SMALL, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def test_checkpoint_round_trip_and_resume(data, tmp_path):
    out = tmp_path / "run"
    summary = run(config(data, out, "epochs=2"))
    assert summary["epochs"] == 2 and (out / "best" / "model.safetensors").is_file()
    assert (out / "curve.png").is_file() and len(json.loads((out / "history.json").read_text())) == 2
    model, catalogue, cfg, device = load_run(out)
    # the reloaded best model reproduces the validation metric it was saved with
    from cobra_scale.eval.offline import evaluate
    from cobra_scale.train.data import load_examples
    from cobra_scale.train.trainer import inference_params

    valid = load_examples(data / "splits" / "loo" / "valid", catalogue, cfg.model.max_items - 1)
    metrics = evaluate(make_recommender(model, catalogue, device), valid.history, valid.targets, inference_params(cfg.inference), progress=False)
    best = json.loads((out / "best" / "state.json").read_text())
    assert metrics["ndcg@10"] == pytest.approx(best["valid_ndcg@10"], abs=1e-6)
    # resume: 2 more epochs continue from the saved state (step count keeps growing)
    summary = run(config(data, out, "epochs=4"))
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[2]["step"] > history[1]["step"]


def test_resume_matches_an_uninterrupted_run_exactly(data, tmp_path):
    """Stopped after epoch 1 and resumed, a run with dropout ends with the very weights of one that ran straight through
    (the torch generator state travels in checkpoints/last/rng.pt); a checkpoint without it still resumes."""
    import torch
    from safetensors.torch import load_file

    straight, paused = tmp_path / "straight", tmp_path / "paused"
    run(config(data, straight, "epochs=2", "model.dropout=0.3"))
    run(config(data, paused, "epochs=2", "model.dropout=0.3", "max_minutes=0.0001"))  # the budget stops it after epoch 1
    assert json.loads((paused / "checkpoints" / "last" / "state.json").read_text())["epoch"] == 1
    assert (paused / "checkpoints" / "last" / "rng.pt").is_file()
    run(config(data, paused, "epochs=2", "model.dropout=0.3"))
    a = load_file(str(straight / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(paused / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an older checkpoint (no rng.pt) resumes with a warning instead of failing
    (paused / "checkpoints" / "last" / "rng.pt").unlink()
    summary = run(config(data, paused, "epochs=3", "model.dropout=0.3"))
    assert summary["epochs"] == 3


@pytest.mark.slow
def test_tiny_dataset_is_learned(data, tmp_path):
    """Users walk i -> i+1: the model must beat chance (10/40 items) by far."""
    summary = run(config(data, tmp_path / "run", "epochs=20", "patience=20"))
    assert summary["valid_recall@10"] >= 0.6


def test_train_cli_bad_paths_are_one_line(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "none"), "--ids", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "items catalogue" in err


@pytest.mark.parametrize("live_rows", [False, True])
def test_catalogue_negatives_and_item_embedding_train_and_reload(data, tmp_path, caplog, live_rows):
    out = tmp_path / "bank"
    with caplog.at_level("INFO", logger="cobra_scale.train.trainer"):
        summary = run(config(data, out, "epochs=2", "catalogue_negatives=-1", "model.item_embedding=true",
                             f"catalogue_live_rows={str(live_rows).lower()}"))
    assert summary["epochs"] == 2
    assert ("each key adds its item's live row" in caplog.text) == live_rows
    model, catalogue, cfg, device = load_run(out)
    assert cfg.model.item_embedding and cfg.model.catalogue_items == len(catalogue)
    assert model.item_emb.weight.abs().sum() > 0  # the rows were trained
    rec = make_recommender(model, catalogue, device)
    assert rec is not None


def test_id_bank_negatives_train(data, tmp_path, caplog):
    """The ID-restricted term trains end to end, with no catalogue term beside it (catalogue_negatives=0)."""
    out = tmp_path / "idbank"
    with caplog.at_level("INFO", logger="cobra_scale.train.trainer"):
        summary = run(config(data, out, "epochs=2", "id_bank_negatives=8"))
    assert summary["epochs"] == 2
    assert "items of the target's own ID" in caplog.text and "catalogue negatives per step" not in caplog.text
    model, catalogue, cfg, device = load_run(out)
    assert cfg.id_bank_negatives == 8


def test_constrained_codes_train_and_reload(data, tmp_path):
    """The trainer gives the model its catalogue's trie; the saved config makes inference score the same way."""
    out = tmp_path / "constrained"
    summary = run(config(data, out, "epochs=2", "model.constrained_codes=true"))
    assert summary["epochs"] == 2
    model, catalogue, cfg, device = load_run(out)
    assert cfg.model.constrained_codes
    from cobra_scale.eval.offline import evaluate
    from cobra_scale.train.data import load_examples
    from cobra_scale.train.trainer import inference_params

    valid = load_examples(data / "splits" / "loo" / "valid", catalogue, cfg.model.max_items - 1)
    metrics = evaluate(make_recommender(model, catalogue, device), valid.history, valid.targets, inference_params(cfg.inference), progress=False)
    best = json.loads((out / "best" / "state.json").read_text())
    assert metrics["ndcg@10"] == pytest.approx(best["valid_ndcg@10"], abs=1e-6)


def test_steps_per_epoch_caps_each_epoch_and_samples_differently(data, tmp_path):
    full = run(config(data, tmp_path / "full", "epochs=1"))
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert full["epochs"] == 1 and history[0]["step"] > 2  # the tiny dataset needs more than 2 steps per pass
    run(config(data, tmp_path / "capped", "epochs=3", "steps_per_epoch=2"))
    history = json.loads((tmp_path / "capped" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6]
    # each capped epoch takes the first steps of that epoch's own shuffled batches
    from cobra_scale.train.trainer import epoch_batches
    import numpy as np

    cfg = config(data, tmp_path / "capped", "steps_per_epoch=2")
    lengths = np.random.default_rng(0).integers(2, 9, size=500)
    first = [np.sort(np.concatenate(epoch_batches(lengths, cfg, e)[:2])) for e in (1, 2)]
    assert not np.array_equal(first[0], first[1])


def test_steps_per_epoch_is_refused_for_the_ray_launcher(data, tmp_path):
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="max_steps"):
        config(data, tmp_path / "r", "steps_per_epoch=5", "launcher=ray")


def test_item_rows_start_from_cooccurrence(data, tmp_path):
    """item_embedding_init=behaviour: rows are the training split's co-occurrence vectors at the text vectors' norm."""
    import numpy as np
    import torch

    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.train.data import read_sequences
    from cobra_scale.train.trainer import init_item_rows, prepare

    cfg = config(data, tmp_path / "rows", "model.item_embedding=true", "item_embedding_init=behaviour", "item_embedding_scale=2.0")
    catalogue, _ = prepare(cfg)
    model = CobraModel(cfg.model)
    train = data / "splits" / "loo" / "train"
    report = init_item_rows(model, catalogue, train, cfg, torch.device("cpu"))
    rows = model.item_emb.weight.detach()
    norms = rows.norm(dim=1)
    covered = norms > 0
    assert int(covered.sum()) == report["items_with_behaviour"] > 0
    assert torch.allclose(norms[covered], torch.full_like(norms[covered], report["row_norm"]), rtol=1e-4)
    with torch.no_grad():
        text = model.eval().encoder(catalogue.tokens, catalogue.token_mask).norm(dim=1).median()
    assert report["row_norm"] == pytest.approx(2.0 * float(text), rel=1e-3)
    # consecutive purchases end up closer than random pairs
    unit = torch.nn.functional.normalize(rows, dim=1)
    pairs = [(int(a), int(b)) for seq in read_sequences(train, catalogue) for a, b in zip(seq[:-1], seq[1:]) if a != b]
    a, b = (torch.tensor(x) for x in zip(*pairs))
    rng = np.random.default_rng(0)
    r = torch.from_numpy(rng.integers(0, len(catalogue), len(pairs)))
    assert (unit[a] * unit[b]).sum(1).mean() > (unit[a] * unit[r]).sum(1).mean() + 0.1


def test_behaviour_item_rows_train(data, tmp_path):
    out = tmp_path / "beh"
    run(config(data, out, "epochs=1", "model.item_embedding=true", "item_embedding_init=behaviour"))
    model, catalogue, cfg, _ = load_run(out)
    assert cfg.item_embedding_init == "behaviour" and model.item_emb.weight.abs().sum() > 0


def test_id_rows_start_from_cooccurrence(data, tmp_path):
    """id_embedding_init=behaviour: each trie node's row is the direction of its items' mean co-occurrence vector."""
    import torch

    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.semantic_ids.behaviour import behaviour_vectors
    from cobra_scale.train.trainer import init_id_rows, prepare

    cfg = config(data, tmp_path / "ids", "id_embedding_init=behaviour", "id_embedding_scale=0.5")
    catalogue, _ = prepare(cfg)
    model = CobraModel(cfg.model)
    train = data / "splits" / "loo" / "train"
    report = init_id_rows(model, catalogue, train, cfg, torch.device("cpu"))
    vectors = torch.from_numpy(behaviour_vectors(train, catalogue.item_ids, cfg.model.d_model, cfg.item_embedding_window, cfg.seed)[0])
    codes = catalogue.codes.long()
    k = catalogue.codes_per_level
    assert len(report["nodes_per_level"]) == cfg.model.levels
    for level in range(cfg.model.levels):
        packed = torch.zeros(len(codes), dtype=torch.long)
        for j in range(level + 1):
            packed = packed * k + codes[:, j]
        table = model.prefix_emb[level].weight.detach()
        nodes = packed.unique()
        assert int((table.norm(dim=1) > 0).sum()) == report["nodes_per_level"][level] <= len(nodes)
        for node in nodes[:5].tolist():  # by hand: mean of the node's items, rescaled
            mean = vectors[packed == node].sum(0)
            expect = mean / mean.norm() * report["row_norm"] if mean.norm() > 0 else torch.zeros_like(mean)
            assert torch.allclose(table[model.prefix_rows(level, torch.tensor(node))], expect, rtol=1e-4, atol=1e-5)
    # the rows reach the code heads (tied): some logits differ from the heads' alone
    h = torch.randn(4, cfg.model.d_model)
    assert not torch.allclose(model.code_logits(h, 0), model.code_heads[0](h))


def test_behaviour_id_rows_train_and_resume(data, tmp_path):
    out = tmp_path / "beh_ids"
    run(config(data, out, "epochs=1", "id_embedding_init=behaviour"))
    model, _, cfg, _ = load_run(out)
    assert cfg.id_embedding_init == "behaviour" and all(t.weight.abs().sum() > 0 for t in model.prefix_emb)
    summary = run(config(data, out, "epochs=2", "id_embedding_init=behaviour"))  # resumes: loads the trained rows
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["id_embedding_init=behaviour", "model.prefix_embeddings=false"], "needs model.prefix_embeddings=true"),
        (["id_embedding_init=ids"], "zeros or behaviour"),
        (["id_embedding_init=behaviour", "id_embedding_scale=-1"], "must be > 0"),
        (["id_embedding_init=behaviour", "launcher=ray"], "local launcher only"),
        (["item_embedding_init=behaviour"], "needs model.item_embedding=true"),
        (["model.item_embedding=true", "item_embedding_init=pca"], "zeros or behaviour"),
        (["model.item_embedding=true", "item_embedding_init=behaviour", "item_embedding_scale=0"], "must be > 0"),
        (["model.item_embedding=true", "item_embedding_init=behaviour", "launcher=ray"], "local launcher only"),
    ],
)
def test_item_embedding_init_bad_settings(data, tmp_path, extra, message):
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(data, tmp_path / "bad", *extra)


def test_time_budget_stops_before_an_epoch_that_would_overshoot(data, tmp_path):
    from cobra_scale.train.trainer import next_epoch_fits

    assert next_epoch_fits(50 * 60, 6 * 60, 60 * 60)  # 56 min <= 60: go on
    assert not next_epoch_fits(55 * 60, 6 * 60, 60 * 60)  # 61 min: stop now, not at 61
    assert next_epoch_fits(1e9, 1e9, float("inf"))  # no budget
    # a budget far below one epoch: one epoch is trained (the first is always run), then it stops, saying why
    summary = run(config(data, tmp_path / "run", "epochs=3", "max_minutes=1e-6"))
    assert summary["epochs"] == 1 and summary["stopped_by"].startswith("time budget") and "would end past it" in summary["stopped_by"]


def test_dense_repeat_bias_trains_and_round_trips(data, tmp_path):
    """The repeat offsets are recorded per epoch, and the reloaded model has the saved offsets."""
    out = tmp_path / "drb"
    run(config(data, out, "epochs=1", "model.repeat_bias=true", "model.dense_repeat_bias=true", "model.dense_repeat_positions=2"))
    record = json.loads((out / "history.json").read_text())[0]
    assert len(record["dense_repeat_offsets"]) == 2 and len(record["repeat_offsets"]) == 2  # tiny_dataset: 2 levels
    assert any(v != 0 for v in record["dense_repeat_offsets"])  # learned, not left at zero
    model, _, _, _ = load_run(out)
    assert model.dense_repeat is not None and tuple(model.dense_repeat.logit.shape) == (1, 2)


def test_ema_weights_are_validated_kept_and_resumed(data, tmp_path):
    """With ema_decay the best checkpoint holds the average, not the raw weights, and resume restores the average."""
    from safetensors.torch import load_file

    out = tmp_path / "ema"
    run(config(data, out, "epochs=1", "ema_decay=0.9"))
    best = load_file(str(out / "best" / "model.safetensors"))
    raw = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    ema = load_file(str(out / "checkpoints" / "last" / "ema.safetensors"))
    steps = json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"]
    assert int(ema["n_averaged"]) == steps > 1
    key = "decoder.blocks.0.qkv.weight"
    assert torch_equal(best[key], ema[f"module.{key}"]) and not torch_equal(best[key], raw[key])
    summary = run(config(data, out, "epochs=2", "ema_decay=0.9"))  # resumes the average
    assert summary["epochs"] == 2
    assert int(load_file(str(out / "checkpoints" / "last" / "ema.safetensors"))["n_averaged"]) > steps
    # resuming a run made without the average is a clear error, not a silent restart of it
    from cobra_scale.errors import CobraError

    run(config(data, tmp_path / "plain", "epochs=1"))
    with pytest.raises(CobraError, match="without ema_decay"):
        run(config(data, tmp_path / "plain", "epochs=2", "ema_decay=0.9"))


@pytest.mark.parametrize("extra, message", [(["ema_decay=1"], r"\[0, 1\)"), (["ema_decay=0.99", "launcher=ray"], "local launcher only")])
def test_ema_bad_settings(data, tmp_path, extra, message):
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(data, tmp_path / "bad", *extra)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_inference_max_per_id_reaches_validation_and_eval(data, tmp_path):
    """inference.max_per_id caps the candidates per beam's ID of the in-memory search (validation, eval without an index)."""
    from cobra_scale.errors import ConfigError
    from cobra_scale.retrieve.build import load_recommender

    out = tmp_path / "cap"
    summary = run(config(data, out, "epochs=1", "inference.max_per_id=1"))
    assert summary["epochs"] == 1
    rec, _, cfg, _ = load_recommender(out)
    assert cfg.inference.max_per_id == 1 and rec.index.max_per_id == 1
    with pytest.raises(ConfigError, match="max_per_id"):
        config(data, tmp_path / "bad", "inference.max_per_id=-1")


def test_successor_rows_with_decay_train_and_resume(data, tmp_path):
    """successor_weight_decay puts the successor rows in their own decayed group; the run reloads and resumes with it,
    and a resume with the setting changed is refused with a message, not a traceback deep in torch."""
    from cobra_scale.errors import CobraError

    out = tmp_path / "succ_wd"
    extra = ["model.successor_embedding=true", "successor_weight_decay=0.5", "id_weight_decay=0.5"]
    run(config(data, out, "epochs=1", *extra))
    model, _, cfg, _ = load_run(out)
    assert cfg.successor_weight_decay == 0.5 and model.succ_emb.weight.abs().sum() > 0  # trained away from zero
    assert run(config(data, out, "epochs=2", *extra))["epochs"] == 2
    with pytest.raises(CobraError, match="successor_weight_decay on"):
        run(config(data, out, "epochs=3", *extra[:1], "id_weight_decay=0.5"))
