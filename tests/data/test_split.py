"""Leave-one-out and time splits."""

import numpy as np
import pyarrow as pa
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
