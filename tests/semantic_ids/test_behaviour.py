"""Behaviour vectors (co-occurrence PPMI + SVD) joining the text embedding of `cobra ids`."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import SEQUENCES_SCHEMA
from cobra_scale.errors import DataError
from cobra_scale.semantic_ids.behaviour import behaviour_vectors, cooccurrence_counts, fill_cold, fit_text_map, join, ppmi_svd, predict_behaviour
from tests.semantic_ids.test_ids_command import catalogue


def sequences(path, rows):
    table = pa.Table.from_pylist([{"user_id": u, "item_ids": s, "timestamps": None} for u, s in enumerate(rows)], schema=SEQUENCES_SCHEMA)
    write_table(table, path / "part-00000.parquet")
    return path


def test_counts_pairs_within_the_window_symmetrically_and_drop_unknown_items(tmp_path, caplog):
    path = sequences(tmp_path / "seq", [[10, 20, 30], [30, 10], [20, 99, 20]])  # 99 is not in the catalogue
    ids = np.array([30, 10, 20])  # rows in catalogue order, not sorted
    with caplog.at_level(logging.WARNING):
        one = cooccurrence_counts(path, ids, window=1).toarray()
    assert "1 interaction(s)" in caplog.text
    # pairs at distance 1: (10,20) (20,30) (30,10); (20,99) and (99,20) dropped; no self pairs
    expected = np.zeros((3, 3))
    for a, b in [(10, 20), (20, 30), (30, 10)]:
        i, j = int(np.flatnonzero(ids == a)[0]), int(np.flatnonzero(ids == b)[0])
        expected[i, j] += 1
        expected[j, i] += 1
    np.testing.assert_array_equal(one, expected)
    two = cooccurrence_counts(path, ids, window=2).toarray()
    assert two[1, 0] == one[1, 0] + 1  # (10, 30) at distance 2 in the first sequence
    assert two[2, 2] == 0  # 20 .. 20 across the unknown item is a self pair


def test_items_used_together_get_close_vectors_and_unused_items_zero(tmp_path):
    rng = np.random.default_rng(0)
    group_a, group_b = list(range(0, 10)), list(range(10, 20))
    rows = [list(rng.choice(group, 5, replace=False)) for _ in range(300) for group in (group_a, group_b)]
    path = sequences(tmp_path / "seq", rows)
    ids = np.arange(21)  # item 20 never appears
    vectors, report = behaviour_vectors(path, ids, dim=4, window=2)
    assert vectors.shape == (21, 4) and report["items_with_behaviour"] == 20
    assert np.all(vectors[20] == 0)
    np.testing.assert_allclose(np.linalg.norm(vectors[:20], axis=1), 1.0, rtol=1e-5)
    cos = vectors[:20] @ vectors[:20].T
    same = np.equal.outer(np.arange(20) < 10, np.arange(20) < 10)
    off = ~np.eye(20, dtype=bool)
    assert cos[same & off].mean() > 0.5 > abs(cos[~same].mean()) + 0.4


def test_join_is_unit_text_then_weighted_behaviour():
    text = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    beh = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    joined = join(text, beh, 0.5, 3)
    np.testing.assert_allclose(joined, [[0.6, 0.8, 0.5, 0, 0], [1, 0, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(join(text, None, 0.5, 3)[:, 2:], 0.0)
    with pytest.raises(DataError):
        join(text, beh, 0.5, 4)


def test_bad_sequences_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cooccurrence_counts(tmp_path / "missing", np.arange(3), 1)
    write_table(pa.table({"x": [1]}), tmp_path / "other" / "part.parquet")
    with pytest.raises(DataError, match="no 'item_ids' column"):
        cooccurrence_counts(tmp_path / "other", np.arange(3), 1)
    with pytest.raises(DataError, match="no pair"):
        cooccurrence_counts(sequences(tmp_path / "single", [[1], [2]]), np.arange(3), 1)
    with pytest.raises(DataError):
        ppmi_svd(np.ones((2, 2)), dim=4)


def test_ids_with_behaviour_fit_and_cold_start_assign(tmp_path):
    items = catalogue()  # 40 items, ids 0..39, four text topics of 10
    write_table(items, tmp_path / "items.parquet")
    # behaviour crosses the text topics (items 10t..10t+9): group g holds the items i with i % 4 == g
    rng = np.random.default_rng(1)
    group = np.arange(40) % 4
    rows = [[int(i) for i in rng.choice(np.flatnonzero(group == g), 4, replace=False)] for _ in range(200) for g in range(4)]
    seq = sequences(tmp_path / "train", rows)
    args = ["ids", "--items", str(tmp_path / "items.parquet")]
    quantizer = ["quantizer.kind=rkmeans", "quantizer.levels=2", "quantizer.codes=4"]
    assert main([*args, "--out", str(tmp_path / "text"), *quantizer]) == 0
    assert main([*args, "--out", str(tmp_path / "beh"), *quantizer, f"behaviour.sequences={seq}", "behaviour.dim=8", "behaviour.weight=2.0"]) == 0
    meta = json.loads((tmp_path / "beh" / "quantizer" / "quantizer.json").read_text())
    assert meta["input_dim"] == 384 + 8 and meta["behaviour"]["weight"] == 2.0 and meta["behaviour"]["items_with_behaviour"] == 40
    assert json.loads((tmp_path / "text" / "quantizer" / "quantizer.json").read_text())["behaviour"] is None

    def purity(folder):  # share of items whose code_0 is their behaviour group's most common code_0
        codes = pq.read_table(folder / "sids.parquet").column("code_0").to_numpy()
        return sum(np.bincount(codes[group == g]).max() for g in range(4)) / 40

    assert purity(tmp_path / "beh") > purity(tmp_path / "text") + 0.3

    new = catalogue(n_per_topic=2, start=1000)
    write_table(new, tmp_path / "new.parquet")
    assert main(["ids", "--items", str(tmp_path / "new.parquet"), "--out", str(tmp_path / "cold"),
                 "--quantizer-dir", str(tmp_path / "beh" / "quantizer")]) == 0  # fmt: skip
    assert pq.read_table(tmp_path / "cold" / "sids.parquet").num_rows == 8
    # behaviour sequences with a saved quantiser: a one-line config error
    assert main(["ids", "--items", str(tmp_path / "new.parquet"), "--out", str(tmp_path / "cold2"),
                 "--quantizer-dir", str(tmp_path / "beh" / "quantizer"), f"behaviour.sequences={seq}"]) != 0  # fmt: skip


def test_text_map_predicts_the_behaviour_of_items_without_co_occurrence():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((300, 6)).astype(np.float32) * rng.uniform(0.5, 3.0, (300, 1)).astype(np.float32)  # any norm
    truth_map = rng.standard_normal((6, 4))
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    truth = unit @ truth_map
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    behaviour = truth.astype(np.float32).copy()
    behaviour[:40] = 0.0  # 40 items never co-occurred
    text_map = fit_text_map(text, behaviour, ridge=1e-3)
    assert text_map.shape == (7, 4)  # + the bias row
    filled, n = fill_cold(text, behaviour, text_map)
    assert n == 40
    np.testing.assert_array_equal(filled[40:], behaviour[40:])  # items with behaviour keep theirs
    np.testing.assert_allclose(np.linalg.norm(filled[:40], axis=1), 1.0, rtol=1e-5)
    cos = (filled[:40] * truth[:40]).sum(axis=1)  # the truth is the *normalised* linear image: a linear fit comes close
    assert cos.min() > 0.95 and cos.mean() > 0.98
    np.testing.assert_allclose(predict_behaviour(text[:40], text_map), filled[:40], rtol=1e-6)
    with pytest.raises(DataError, match="dimension"):
        predict_behaviour(text[:, :5], text_map)
    with pytest.raises(DataError, match="none co-occur"):
        fit_text_map(text, np.zeros_like(behaviour))


def test_cold_text_spreads_items_without_co_occurrence_and_new_items_agree(tmp_path, caplog):
    """Items 40..79 read exactly like items 0..39 but never co-occur. With behaviour.cold=zeros they share an empty
    behaviour half and crowd together; with cold=text they get the behaviour their text predicts and land with their twins."""
    items = pa.concat_tables([catalogue(), catalogue(start=40)])
    write_table(items, tmp_path / "items.parquet")
    rng = np.random.default_rng(2)
    topic = np.arange(40) // 10  # behaviour follows the text topic, so text predicts it
    rows = [[int(i) for i in rng.choice(np.flatnonzero(topic == t), 4, replace=False)] for _ in range(200) for t in range(4)]
    seq = sequences(tmp_path / "train", rows)
    common = ["ids", "--items", str(tmp_path / "items.parquet"), "quantizer.kind=rkmeans", "quantizer.levels=2", "quantizer.codes=4",
              f"behaviour.sequences={seq}", "behaviour.dim=8", "behaviour.weight=2.0"]  # fmt: skip

    def first_codes(folder):
        table = pq.read_table(folder / "sids.parquet").sort_by("item_id")
        return table.column("code_0").to_numpy(), table.column("sid").to_numpy()

    with caplog.at_level(logging.WARNING):
        assert main([*common, "--out", str(tmp_path / "zeros")]) == 0
    assert "behaviour.cold=text" in caplog.text  # the giant-ID warning names the remedy
    assert main([*common, "--out", str(tmp_path / "text"), "behaviour.cold=text"]) == 0
    meta = json.loads((tmp_path / "text" / "quantizer" / "quantizer.json").read_text())
    assert meta["behaviour"]["cold"] == "text" and meta["behaviour"]["items_filled_from_text"] == 40
    assert (tmp_path / "text" / "quantizer" / "behaviour_map.safetensors").is_file()
    assert not (tmp_path / "zeros" / "quantizer" / "behaviour_map.safetensors").exists()
    zeros, _ = first_codes(tmp_path / "zeros")
    text, sids = first_codes(tmp_path / "text")
    # the cold twins' first code agrees with their co-occurring twin's far more often with cold=text
    agree = lambda c: float((c[40:] == c[:40]).mean())  # noqa: E731
    assert agree(text) >= 0.75 and agree(text) > agree(zeros) + 0.4
    assert len(set(text[40:])) > len(set(zeros[40:]))

    # a new item assigned later with the saved quantiser gets the same predicted behaviour: the same ID as its fitted twin
    write_table(catalogue(start=1000), tmp_path / "new.parquet")
    assert main(["ids", "--items", str(tmp_path / "new.parquet"), "--out", str(tmp_path / "cold"),
                 "--quantizer-dir", str(tmp_path / "text" / "quantizer")]) == 0  # fmt: skip
    new = pq.read_table(tmp_path / "cold" / "sids.parquet").sort_by("item_id").column("sid").to_numpy()
    np.testing.assert_array_equal(new, sids[40:])
    # a quantiser folder missing its map is a one-line error, not a silent fall back to zeros
    (tmp_path / "text" / "quantizer" / "behaviour_map.safetensors").unlink()
    assert main(["ids", "--items", str(tmp_path / "new.parquet"), "--out", str(tmp_path / "cold2"),
                 "--quantizer-dir", str(tmp_path / "text" / "quantizer")]) != 0  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "bad"), "behaviour.cold=mean"]) != 0
