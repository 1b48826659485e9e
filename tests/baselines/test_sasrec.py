"""SASRec baseline: learns a deterministic pattern, is causal, writes its artifacts."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from cobra_scale.baselines.configs import SASRecConfig
from cobra_scale.baselines.sasrec import SASRec, SASRecShape, load_model, run, training_windows
from cobra_scale.config import load_config
from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import EXAMPLES_SCHEMA, ITEMS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.errors import ConfigError, DataError

N_ITEMS = 30
ITEM_IDS = 1000 + 7 * np.arange(N_ITEMS)  # non-contiguous ids: the code must map them


def write_dataset(root, n_users=240, seed=0, extra_train_id=None):
    """A leave-one-out dataset where item k is always followed by item k+1 (cyclically)."""
    rng = np.random.default_rng(seed)
    items = pa.table(
        {"item_id": ITEM_IDS, "title": [f"item {i}" for i in ITEM_IDS], "brand": [None] * N_ITEMS, "categories": [None] * N_ITEMS,
         "price": [None] * N_ITEMS, "description": [None] * N_ITEMS},
        schema=ITEMS_SCHEMA,
    )
    write_table(items, root / "items.parquet")
    train, valid, test = [], [], []
    for user in range(n_users):
        length = int(rng.integers(5, 13))  # < N_ITEMS: no item repeats inside a sequence
        start = int(rng.integers(N_ITEMS))
        seq = [int(ITEM_IDS[(start + j) % N_ITEMS]) for j in range(length)]
        train.append({"user_id": user, "item_ids": seq[:-2], "timestamps": None})
        valid.append({"user_id": user, "history": seq[:-2][-20:], "history_ts": None, "targets": [seq[-2]]})
        test.append({"user_id": user, "history": seq[:-1][-20:], "history_ts": None, "targets": [seq[-1]]})
    if extra_train_id is not None:
        train[0]["item_ids"] = train[0]["item_ids"] + [extra_train_id]
    split = root / "splits" / "loo"
    write_table(pa.Table.from_pylist(train, schema=SEQUENCES_SCHEMA), split / "train" / "part-00000.parquet")
    write_table(pa.Table.from_pylist(valid, schema=EXAMPLES_SCHEMA), split / "valid" / "part-00000.parquet")
    write_table(pa.Table.from_pylist(test, schema=EXAMPLES_SCHEMA), split / "test" / "part-00000.parquet")
    return root


def tiny_config(tmp_path, **overrides):
    values = dict(data=str(tmp_path / "data"), out=str(tmp_path / "out"), d_model=32, heads=2, blocks=1, dropout=0.1, lr=5e-3,
                  batch_size=32, epochs=10, patience=3, eval_every=1, threads=1, progress=False, eval_batch_size=64)
    values.update(overrides)
    return load_config(SASRecConfig, overrides=values)


def test_learns_successor_pattern_and_writes_results(tmp_path):
    write_dataset(tmp_path / "data")
    summary = run(tiny_config(tmp_path))
    out = tmp_path / "out"
    for name in ("results.json", "config.yaml", "model.safetensors", "model.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["unmasked"]["recall@5"] >= 0.95
    assert results["test"]["masked"]["recall@10"] >= 0.95
    assert results["valid"]["unmasked"]["ndcg@10"] >= 0.9
    assert 1 <= results["best_epoch"] <= results["epochs_run"] <= 10
    assert results["history"][0]["valid"]["unmasked"]["recall@10"] <= results["valid"]["unmasked"]["recall@10"]
    assert summary["best_epoch"] == results["best_epoch"]

    # the saved best model reloads and ranks the successor first
    model, ids = load_model(out)
    np.testing.assert_array_equal(ids, ITEM_IDS)
    hist = torch.tensor([[0, 3, 4, 5]])  # indices of ITEM_IDS[2..4]
    assert int(model.item_logits(model(hist)[:, -1]).argmax()) + 1 == 6


def test_time_budget_stops_gracefully(tmp_path):
    write_dataset(tmp_path / "data", n_users=40)
    run(tiny_config(tmp_path, max_minutes=1e-6))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["stop_reason"] == "max_minutes"
    assert results["best_epoch"] == 1 and set(results["test"]) == {"unmasked", "masked"}


def test_causality():
    torch.manual_seed(0)
    model = SASRec(SASRecShape(n_items=50, d_model=16, heads=2, blocks=2, ffn_dim=16, dropout=0.0, max_len=8)).eval()
    a = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[:, 5:] = torch.tensor([40, 41, 42])
    ha, hb = model(a), model(b)
    torch.testing.assert_close(ha[:, :5], hb[:, :5])
    assert (ha[:, 5:] - hb[:, 5:]).abs().max() > 1e-3
    # padding never leaks: dropping the left padding gives the same outputs
    torch.testing.assert_close(model(a[:1, 2:]), ha[:1, 2:])


def test_training_windows_cover_every_target_once():
    seq = np.arange(1, 31)  # 30 items -> 29 targets
    inputs, targets = training_windows(seq, np.array([0, 30]), max_history=20)
    assert inputs.shape == (2, 20)
    assert sorted(targets[targets > 0].tolist()) == list(range(2, 31))
    assert targets[0].tolist() == list(range(11, 31)) and inputs[0].tolist() == list(range(10, 30))  # cut from the end
    assert inputs[1].tolist() == [0] * 11 + list(range(1, 10))  # the sequence's start: left padding
    np.testing.assert_array_equal(inputs[:, 1:][targets[:, :-1] > 0], targets[:, :-1][targets[:, :-1] > 0])


def test_unknown_item_and_bad_config(tmp_path):
    write_dataset(tmp_path / "data", n_users=10, extra_train_id=5)
    with pytest.raises(DataError, match="not in items.parquet"):
        run(tiny_config(tmp_path))
    with pytest.raises(ConfigError):
        load_config(SASRecConfig, overrides={"out": "x", "d_model": 30, "heads": 4})
    with pytest.raises(ConfigError):
        load_config(SASRecConfig, overrides={"out": "x", "select_metric": "ndcg@20"})


def test_same_seed_same_run(tmp_path):
    write_dataset(tmp_path / "data", n_users=40)
    runs = []
    for name in ("a", "b"):
        run(tiny_config(tmp_path, out=str(tmp_path / name), epochs=2, patience=2))
        results = json.loads((tmp_path / name / "results.json").read_text())
        runs.append([(h["train_loss"], h["valid"]) for h in results["history"]] + [results["test"]])
    assert runs[0] == runs[1]
