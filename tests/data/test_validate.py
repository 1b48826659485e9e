"""Validation policy: schema checks and casts, items / sequences / examples repairs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.data.schemas import EVENTS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.data.validate import (
    Catalogue,
    Report,
    apply_casts,
    check_schema,
    validate_items,
    validate_lists,
    validate_table,
)
from cobra_scale.errors import DataError

T0 = 1_767_225_600


# ---------------------------------------------------------------------------- schema


def test_check_schema_exact_match_needs_nothing() -> None:
    assert check_schema(EVENTS_SCHEMA, EVENTS_SCHEMA, "f.parquet") == []


def test_check_schema_casts_and_errors() -> None:
    schema = pa.schema([("user_id", pa.int32()), ("item_id", pa.float64()), ("ts", pa.timestamp("us")),
                        ("event_type", pa.dictionary(pa.int32(), pa.string())), ("extra", pa.string())])
    actions = {a.column: a.kind for a in check_schema(schema, EVENTS_SCHEMA, "f.parquet", required=["user_id", "item_id", "ts", "event_type"])}
    assert actions == {"user_id": "int", "item_id": "float_integral", "ts": "timestamp", "event_type": "string"}
    with pytest.raises(DataError, match=r"^f\.parquet: missing column 'ts' \(int64\)"):
        check_schema(schema.remove(2), EVENTS_SCHEMA, "f.parquet", required=["ts"])
    # optional columns may be absent
    assert check_schema(schema.remove(2), EVENTS_SCHEMA, "f.parquet", required=["user_id"])
    bad = pa.schema([("user_id", pa.string())])
    with pytest.raises(DataError, match=r"f\.parquet: column 'user_id' has type string, expected int64 \(no safe cast\)"):
        check_schema(bad, EVENTS_SCHEMA, "f.parquet", required=["user_id"])
    # a timestamp type is only accepted for time columns
    with pytest.raises(DataError, match="column 'user_id' has type timestamp"):
        check_schema(pa.schema([("user_id", pa.timestamp("s"))]), EVENTS_SCHEMA, "f", required=["user_id"])
    with pytest.raises(DataError, match="appears 2 times"):
        check_schema(pa.schema([("user_id", pa.int64()), ("user_id", pa.int64())]), EVENTS_SCHEMA, "f", required=["user_id"])


def test_apply_casts_values() -> None:
    schema = pa.schema([("user_id", pa.uint64()), ("item_ids", pa.large_list(pa.int32()))])
    table = pa.table({"user_id": pa.array([1, 2], pa.uint64()), "item_ids": pa.array([[1, 2], None], pa.large_list(pa.int32()))})
    actions = check_schema(schema, SEQUENCES_SCHEMA, "f", required=["user_id", "item_ids"])
    out = apply_casts(table, actions, "f")
    assert out.schema.field("item_ids").type == pa.list_(pa.int64())
    assert out.column("item_ids").to_pylist() == [[1, 2], None]
    big = pa.table({"user_id": pa.array([2**63 + 1], pa.uint64())})
    with pytest.raises(DataError, match=r"^f: column 'user_id' \(uint64\) has values that do not fit"):
        apply_casts(big, check_schema(big.schema, SEQUENCES_SCHEMA, "f", required=["user_id"]), "f")
    inf = pa.table({"user_id": pa.array([1.0, float("inf")])})
    with pytest.raises(DataError, match="infinite"):
        apply_casts(inf, check_schema(inf.schema, SEQUENCES_SCHEMA, "f", required=["user_id"]), "f")


# ---------------------------------------------------------------------------- report / catalogue


def test_report_strict_and_balance() -> None:
    r = Report("events", strict=True)
    r.drop("event_type", 3)  # a user-chosen filter: never an error
    with pytest.raises(DataError, match=r"^x\.parquet: 2 row\(s\) with a null ts in column 'ts'; strict mode"):
        r.drop("null_ts", 2, file="x.parquet", column="ts")
    r.rows_in, r.rows_out = 10, 7
    r.check_balance()
    r.rows_out = 6
    with pytest.raises(RuntimeError, match="row accounting mismatch"):
        r.check_balance()


@pytest.mark.parametrize("ids", [[3, 1, 7, 100], [5, 10**15, 2**40]])
def test_catalogue_contains(ids: list) -> None:
    cat = Catalogue(np.array(ids))
    x = np.array([-1, 0, 1, 3, 7, 8, 100, 101, 10**15, 2**40, 2**62])
    assert cat.contains(x).tolist() == [v in ids for v in x.tolist()]


# ---------------------------------------------------------------------------- items


def items_table(**cols) -> pa.Table:
    base = {"item_id": [1, 2, 3], "title": ["a", "b", "c"]}
    base.update(cols)
    return pa.table(base)


def test_items_missing_title_dropped_or_strict() -> None:
    table = items_table(title=["a", None, "  "], brand=[None, "x", None])
    r = Report("items")
    out = validate_items(table, "items.parquet", r)
    assert out.column("item_id").to_pylist() == [1]
    assert r.dropped == {"missing_title": 2} and r.rows_in == 3 and r.rows_out == 1
    with pytest.raises(DataError, match=r"items\.parquet: 2 row\(s\) with a null or blank title in column 'title'"):
        validate_items(table, "items.parquet", Report("items", strict=True))


def test_items_null_negative_duplicate_ids() -> None:
    r = Report("items")
    out = validate_items(items_table(item_id=[1, None, -2]), "f", r)
    assert out.num_rows == 1 and r.dropped == {"null_item_id": 1, "negative_item_id": 1}
    with pytest.raises(DataError, match=r"f: column 'item_id' has 1 duplicated id\(s\) \(e\.g\. 2\)"):
        validate_items(items_table(item_id=[2, 2, 3]), "f", Report("items"))


def test_validate_items_files(tmp_path: Path) -> None:
    pq.write_table(items_table(), tmp_path / "a.parquet")
    pq.write_table(items_table(item_id=[4, 5, 3]), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="duplicated id"):
        validate_table(tmp_path, "items")
    (tmp_path / "b.parquet").unlink()
    pq.write_table(pa.table({"item_id": [9]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: missing column 'title'"):
        validate_table(tmp_path, "items")
    (tmp_path / "c.parquet").unlink()
    report = validate_table(tmp_path, "items").to_dict()
    assert report["rows_in"] == report["rows_out"] == 3 and report["items"] == 3


# ---------------------------------------------------------------------------- sequences / examples


def seq_table(user_ids, item_ids, timestamps) -> pa.Table:
    return pa.table({"user_id": pa.array(user_ids, pa.int64()), "item_ids": pa.array(item_ids, pa.list_(pa.int64())),
                     "timestamps": pa.array(timestamps, pa.list_(pa.int64()))})


def test_sequences_repairs() -> None:
    table = seq_table(
        [1, 2, 3, 4, 5, 6, None, -1],
        [[1, 2, 3], [4, -5, 6], [-1, -2], [7, 8], [9, 10], [11], [1], [1]],
        [[1, 2, 3], [5, 6, 7], [1, 2], [1, 2, 3], [20, 10], None, [1], [1]],
    )
    r = Report("sequences")
    out = validate_lists(table, "s.parquet", r, "sequences")
    assert out.to_pylist() == [
        {"user_id": 1, "item_ids": [1, 2, 3], "timestamps": [1, 2, 3]},
        {"user_id": 2, "item_ids": [4, 6], "timestamps": [5, 7]},  # negative element removed with its time
        {"user_id": 5, "item_ids": [10, 9], "timestamps": [10, 20]},  # sorted by time
        {"user_id": 6, "item_ids": [11], "timestamps": None},  # timestamps may be null
    ]
    assert r.dropped == {"null_user_id": 1, "negative_user_id": 1, "timestamps_length_mismatch": 1, "empty_item_ids": 1}
    assert r.removed == {"item_ids:negative_id": 3}
    assert r.repaired == {"unsorted_timestamps": 1}
    r.check_balance()
    assert out.schema.equals(SEQUENCES_SCHEMA, check_metadata=False)


def test_sequences_strict_and_catalogue() -> None:
    table = seq_table([1], [[1, 2]], [[1, 2]])
    with pytest.raises(DataError, match=r"s: 1 list element\(s\): item_ids:unknown_item in column 'item_ids' \(e\.g\. 2\)"):
        validate_lists(table, "s", Report("sequences", strict=True), "sequences", Catalogue(np.array([1])))
    with pytest.raises(DataError, match="timestamps_length_mismatch"):
        validate_lists(seq_table([1], [[1, 2]], [[1]]), "s", Report("sequences", strict=True))


def test_examples() -> None:
    table = pa.table({
        "user_id": [1, 2, 3],
        "history": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())),
        "history_ts": pa.array([[5, 4], [], [1]], pa.list_(pa.int64())),
        "targets": pa.array([[9], [8], [-1]], pa.list_(pa.int64())),
    })
    r = Report("examples")
    out = validate_lists(table, "e", r, "examples")
    assert out.to_pylist() == [{"user_id": 1, "history": [2, 1], "history_ts": [4, 5], "targets": [9]}]
    assert r.dropped == {"empty_history": 1, "empty_targets": 1}
    assert r.removed == {"targets:negative_id": 1} and r.repaired == {"unsorted_history_ts": 1}


def test_validate_table_sequences_files(tmp_path: Path) -> None:
    pq.write_table(seq_table([1, 2], [[1, -2], [3]], [[1, 2], [1]]), tmp_path / "part-00000.parquet")
    schema = pa.schema([("user_id", pa.int32()), ("item_ids", pa.list_(pa.int32()))])
    pq.write_table(pa.table({"user_id": [3], "item_ids": [[4, 5]]}, schema=schema), tmp_path / "part-00001.parquet")
    report = validate_table(tmp_path, "sequences").to_dict()
    assert report["rows_in"] == 3 and report["rows_out"] == 3 and report["removed"] == {"item_ids:negative_id": 1}
    assert report["casts"] == {"item_ids": "list<int32> -> list<int64>", "user_id": "int32 -> int64"}
    bad = pa.table({"user_id": [1], "item_ids": pa.array([[1.5]], pa.list_(pa.float64()))})
    pq.write_table(bad, tmp_path / "part-00002.parquet")
    with pytest.raises(DataError, match=r"part-00002\.parquet: column 'item_ids' \(double\) has non-integral values"):
        validate_table(tmp_path, "sequences")


# ---------------------------------------------------------------------------- CLI


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ev = tmp_path / "events" / "day=2026-01-01"
    ev.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [1, 1, 1, 2], "item_id": [1, 1, 2, 3], "ts": [T0, T0, T0 - 5, T0],
                             "event_type": ["click", "click", "conversion", "click"], "value": pa.array([None] * 4, pa.float32())}),
                   ev / "part-00000.parquet")
    report_path = tmp_path / "report.json"
    rc = main(["data", "validate", "--path", str(tmp_path / "events"), "--table", "events", "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert rc == 0 and "ok: False" in printed
    report = json.loads(report_path.read_text())
    assert report["dropped"] == {"duplicate": 1} and report["users_out_of_order"] == 1
    assert report["event_type_counts"] == {"click": 3, "conversion": 1}
    assert report["rows_in"] == report["rows_out"] + 1

    rc = main(["data", "validate", "--path", str(tmp_path / "events"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "duplicate" in err and "Traceback" not in err

    pq.write_table(items_table(item_id=[1, 1, 2]), tmp_path / "items.parquet")
    rc = main(["data", "validate", "--path", str(tmp_path / "items.parquet"), "--table", "items"])
    err = capsys.readouterr().err
    assert rc == 2 and "duplicated id" in err and err.strip().count("\n") == 0


def test_check_sequences_table_fills_optional_columns() -> None:
    from cobra_scale.data.validate import check_sequences_table

    table = pa.table({"user_id": pa.array([2, 1], pa.int32()), "item_ids": pa.array([[1, -1], [3]], pa.list_(pa.int16()))})
    r = Report("sequences")
    out = check_sequences_table(table, "s.parquet", r)
    assert out.schema.equals(SEQUENCES_SCHEMA, check_metadata=False)
    assert out.to_pylist() == [{"user_id": 2, "item_ids": [1], "timestamps": None},
                               {"user_id": 1, "item_ids": [3], "timestamps": None}]
    assert r.removed == {"item_ids:negative_id": 1} and set(r.casts) == {"user_id", "item_ids"}
    with pytest.raises(DataError, match=r"s\.parquet: missing column 'item_ids'"):
        check_sequences_table(pa.table({"user_id": [1]}), "s.parquet")
