"""Leave-one-out and time splits."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from cobra_scale.data.schemas import EXAMPLES_SCHEMA, SEQUENCES_SCHEMA, day_start
from cobra_scale.data.split import split_loo, split_time, take_ranges, training_examples


def seqs(rows, with_ts=True):
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_ids": [r[1] for r in rows],
            "timestamps": [r[2] if with_ts else None for r in rows],
        },
        schema=SEQUENCES_SCHEMA,
    )


def test_take_ranges():
    vals, off = take_ranges(np.arange(10), np.array([0, 5, 7]), np.array([2, 5, 10]))
    assert vals.tolist() == [0, 1, 7, 8, 9]
    assert off.tolist() == [0, 2, 2, 5]


def test_loo_last_is_test_second_last_is_valid():
    table = seqs([(7, [1, 2, 3, 4, 5], None), (8, [9, 8], None), (9, list(range(30)), None)], with_ts=False)
    train, valid, test, counts = split_loo(table, max_history=20)
    assert counts == {"users_in": 3, "users_out": 2, "dropped_users_fewer_than_3_items": 1}
    assert train.schema == SEQUENCES_SCHEMA and valid.schema == EXAMPLES_SCHEMA
    assert train.to_pylist()[0] == {"user_id": 7, "item_ids": [1, 2, 3], "timestamps": None}
    v, t = valid.to_pylist(), test.to_pylist()
    assert v[0]["history"] == [1, 2, 3] and v[0]["targets"] == [4]
    assert t[0]["history"] == [1, 2, 3, 4] and t[0]["targets"] == [5]
    # truncation to the last 20 items of the history
    assert v[1]["history"] == list(range(8, 28)) and v[1]["targets"] == [28]
    assert t[1]["history"] == list(range(9, 29)) and t[1]["targets"] == [29]
    assert train.to_pylist()[1]["item_ids"] == list(range(28))  # full training part


def test_loo_keeps_timestamps():
    table = seqs([(1, [1, 2, 3], [10, 20, 30])])
    train, valid, test, _ = split_loo(table, 20)
    assert train.column("timestamps").to_pylist() == [[10]]
    assert test.column("history_ts").to_pylist() == [[10, 20]]


def test_time_split():
    d = lambda day, h=0: day_start(day) + 3600 * h  # noqa: E731
    table = seqs(
        [
            # history before valid day, items on valid and test days (duplicate target deduped)
            (1, [1, 2, 3, 4, 4, 5], [d("2026-01-01"), d("2026-01-02"), d("2026-01-06", 1), d("2026-01-07", 1), d("2026-01-07", 2), d("2026-01-07", 3)]),
            # only on the test day: no history -> not a test row, counted
            (2, [7, 8], [d("2026-01-07"), d("2026-01-07", 1)]),
            # only training days
            (3, [1, 9], [d("2026-01-01"), d("2026-01-03")]),
            # events after the test day are ignored
            (4, [2, 3, 6], [d("2026-01-02"), d("2026-01-07"), d("2026-01-08")]),
        ]
    )
    train, valid, test, counts = split_time(table, 20, valid_start=d("2026-01-06"), test_start=d("2026-01-07"))
    assert train.column("user_id").to_pylist() == [1, 3, 4]
    assert train.column("item_ids").to_pylist()[0] == [1, 2]
    assert valid.to_pylist() == [{"user_id": 1, "history": [1, 2], "history_ts": [d("2026-01-01"), d("2026-01-02")], "targets": [3]}]
    t = {r["user_id"]: r for r in test.to_pylist()}
    assert set(t) == {1, 4}
    assert t[1]["history"] == [1, 2, 3] and t[1]["targets"] == [4, 5]
    assert t[4]["history"] == [2] and t[4]["targets"] == [3]
    assert counts["test_users_without_history"] == 1
    assert counts["events_after_test_day"] == 1


def test_time_split_needs_timestamps():
    from cobra_scale.errors import DataError

    with pytest.raises(DataError, match="timestamps"):
        split_time(seqs([(1, [1, 2, 3], None)], with_ts=False), 20, 0, 86400)


def test_training_examples_prefixes():
    ex = list(training_examples([1, 2, 3, 4], max_history=2))
    assert ex == [([1], 2), ([1, 2], 3), ([2, 3], 4)]


def test_loo_cold_keeps_cold_items_out_of_training(tmp_path):
    from cobra_scale.data.configs import SplitConfig
    from cobra_scale.data.io import write_table
    from cobra_scale.data.split import remove_cold, split_files

    # items 100.. are test targets of some users and also appear inside other sequences
    rows = [(u, [1 + (u + j) % 9 for j in range(6)] + [100 + u % 10], None) for u in range(40)]
    rows += [(99, [100, 1, 2, 101, 3, 4], None)]  # cold candidates in the middle of a history
    write_table(seqs(rows, with_ts=False), tmp_path / "seq" / "part-00000.parquet")
    report = split_files(SplitConfig(sequences=str(tmp_path / "seq"), out=str(tmp_path / "out"), kind="loo_cold", cold_fraction=0.3, seed=1))
    cold = set(pa.parquet.read_table(tmp_path / "out" / "cold_items.parquet").column("item_id").to_pylist())
    assert report["cold_items"] == len(cold) == round(0.3 * report["test_target_items"]) > 0
    train = pa.parquet.read_table(tmp_path / "out" / "train").to_pylist()
    valid = pa.parquet.read_table(tmp_path / "out" / "valid").to_pylist()
    test = pa.parquet.read_table(tmp_path / "out" / "test").to_pylist()
    seen = {i for r in train for i in r["item_ids"]} | {i for r in valid for i in r["history"] + r["targets"]}
    seen |= {i for r in test for i in r["history"]}
    assert not (seen & cold)  # never in training, validation or any history
    from cobra_scale.train.data import training_windows

    windows = training_windows([np.array(r["item_ids"]) for r in train], max_items=4)
    assert windows and not (set(np.concatenate(windows).tolist()) & cold)  # what training batches are cut from
    cold_targets = [r for r in test if r["targets"][0] in cold]
    assert len(cold_targets) == report["test_users_cold_target"] > 0
    # remove_cold keeps a cold item only as a row's last item
    table, removed = remove_cold(seqs([(1, [5, 6, 5, 7, 5], None)], with_ts=False), np.array([5]))
    assert table.column("item_ids").to_pylist() == [[6, 7, 5]] and removed == 2


def test_loo_cold_bad_fraction_is_a_config_error():
    from cobra_scale.data.configs import SplitConfig
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="cold_fraction"):
        SplitConfig(sequences="x", out="y", kind="loo_cold", cold_fraction=1.5)


def test_loo_drop_last_puts_selection_in_tests_position():
    import pytest

    from cobra_scale.data.configs import SplitConfig
    from cobra_scale.errors import ConfigError

    table = seqs([(7, [1, 2, 3, 4, 5, 6], None), (8, [9, 8, 7], None), (9, list(range(30)), None)], with_ts=False)
    _, usual_valid, _, _ = split_loo(table, 20)
    train, valid, test, counts = split_loo(table, 20, drop_last=1)
    assert counts["users_out"] == 2  # user 8 keeps 2 items: too few
    # its test rows are the usual validation rows, user for user
    usual = {r["user_id"]: r for r in usual_valid.to_pylist()}
    assert [r["user_id"] for r in test.to_pylist()] == [7, 9]
    for row in test.to_pylist():
        assert row == usual[row["user_id"]]
    # ... and their histories end (item 4) where training stops short: no training prefix has 4 as its target
    assert test.to_pylist()[0]["history"] == [1, 2, 3, 4]
    assert train.to_pylist()[0]["item_ids"] == [1, 2, 3]
    assert valid.to_pylist()[0] == {**valid.to_pylist()[0], "history": [1, 2, 3], "targets": [4]}
    with pytest.raises(ConfigError, match="kind=loo only"):
        SplitConfig(sequences="s", out="o", kind="time", drop_last=1)
    with pytest.raises(ConfigError, match=">= 0"):
        SplitConfig(sequences="s", out="o", drop_last=-1)
