"""Sessionisation: exact sequences from hand-made events, every bad-input case, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cobra_scale.cli import main
from cobra_scale.data.schemas import EVENTS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.data.sessionize import sessionize_events, splitmix64, user_shard
from cobra_scale.errors import DataError

T0 = 1_767_225_600  # 2026-01-01 00:00 UTC
DAY = 86_400


def write_events(path: Path, rows: list[tuple], schema: pa.Schema | None = None, columns: dict | None = None) -> Path:
    """Write (user, item, ts, type) rows (or raw ``columns``) as one Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        u, i, t, e = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
        columns = {"user_id": u, "item_id": i, "ts": t, "event_type": e, "value": [None] * len(u)}
    if schema is None:
        schema = pa.schema([EVENTS_SCHEMA.field(n).with_nullable(True) for n in columns])
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def read_sequences(out: Path) -> dict[int, tuple[list, list]]:
    seqs = {}
    for f in sorted(out.glob("part-*.parquet")):
        for row in pq.read_table(f).to_pylist():
            assert row["user_id"] not in seqs
            seqs[row["user_id"]] = (row["item_ids"], row["timestamps"])
    return seqs


def balanced(summary: dict) -> bool:
    return summary["rows_in"] == summary["rows_out"] + sum(summary["dropped"].values())


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """Three files over two days. User 1's day-2 file holds an event older than day 1's
    (a late arrival), user 2 has a ts tie (arrival order decides), user 3 only converts."""
    root = tmp_path / "events"
    write_events(root / "day=2026-01-01" / "part-00000.parquet", [
        (1, 10, T0 + 100, "click"),
        (2, 20, T0 + 50, "click"),
        (2, 21, T0 + 50, "click"),  # tie with the previous row: stays after it
        (3, 30, T0 + 10, "conversion"),
    ])
    write_events(root / "day=2026-01-01" / "part-00001.parquet", [
        (1, 11, T0 + 200, "click"),
        (2, 22, T0 + 40, "click"),  # earlier than the rows above: user 2 out of order
        (4, 40, T0 + 5, "click"),
    ])
    write_events(root / "day=2026-01-02" / "part-00000.parquet", [
        (1, 12, T0 + DAY + 1, "click"),
        (1, 13, T0 + 150, "click"),  # late arrival: sorted between 10 and 11
        (2, 23, T0 + DAY + 7, "conversion"),
        (4, 41, T0 + DAY + 9, "click"),
    ])
    return root


def test_exact_sequences(events: Path, tmp_path: Path) -> None:
    out = tmp_path / "seq"
    report = sessionize_events(events, out, shards=2, workers=1).to_dict()
    seqs = read_sequences(out)
    assert seqs == {
        1: ([10, 13, 11, 12], [T0 + 100, T0 + 150, T0 + 200, T0 + DAY + 1]),
        2: ([22, 20, 21], [T0 + 40, T0 + 50, T0 + 50]),
        4: ([40, 41], [T0 + 5, T0 + DAY + 9]),
    }
    assert report["rows_in"] == 11 and report["rows_out"] == 9
    assert report["dropped"] == {"event_type": 2}
    assert report["users_out"] == 3 and report["users_out_of_order"] == 2
    assert report["event_type_counts"] == {"click": 9, "conversion": 2}
    assert balanced(report)
    # Shard = splitmix64(user) % shards, rows sorted by user inside a shard, exact schema.
    for s in range(2):
        table = pq.read_table(out / f"part-{s:05d}.parquet")
        assert table.schema.equals(SEQUENCES_SCHEMA, check_metadata=False)
        users = table.column("user_id").to_pylist()
        assert users == sorted(users)
        assert all(user_shard(u, 2)[0] == s for u in users)


def test_auto_shards_bound_the_events_per_shard(events: Path, tmp_path: Path, monkeypatch) -> None:
    """shards=0 (the default): one shard per EVENTS_PER_SHARD input events, so shard size does not grow with users."""
    import cobra_scale.data.sessionize as sessionize

    assert sessionize_events(events, tmp_path / "one", workers=1).to_dict()["shards"] == 1  # 11 events
    monkeypatch.setattr(sessionize, "EVENTS_PER_SHARD", 4)
    report = sessionize_events(events, tmp_path / "auto", workers=1).to_dict()
    assert report["shards"] == 3 == len(list((tmp_path / "auto").glob("part-*.parquet")))  # ceil(11 / 4)
    assert read_sequences(tmp_path / "auto") == read_sequences(tmp_path / "one")


def test_all_event_types(events: Path, tmp_path: Path) -> None:
    out = tmp_path / "seq"
    report = sessionize_events(events, out, event_types=["click", "conversion"], shards=1, workers=1).to_dict()
    seqs = read_sequences(out)
    assert seqs[3] == ([30], [T0 + 10])
    assert seqs[2][0] == [22, 20, 21, 23]
    assert report["dropped"] == {} and report["rows_out"] == 11


def test_merge_path_and_pool_match_inline(events: Path, tmp_path: Path) -> None:
    expected = (sessionize_events(events, tmp_path / "a", shards=2, workers=1), read_sequences(tmp_path / "a"))
    # partitions > shards: sorted runs are k-way merged per shard (rounded up to 6).
    merged = sessionize_events(events, tmp_path / "b", shards=2, partitions=5, workers=1)
    assert merged.extra["partitions"] == 6
    assert read_sequences(tmp_path / "b") == expected[1]
    for s in range(2):
        users = pq.read_table(tmp_path / "b" / f"part-{s:05d}.parquet").column("user_id").to_pylist()
        assert users == sorted(users)
    # A real process pool (spawn) gives the same output and counts.
    pooled = sessionize_events(events, tmp_path / "c", shards=2, partitions=4, workers=2)
    assert read_sequences(tmp_path / "c") == expected[1]
    assert pooled.to_dict()["dropped"] == expected[0].to_dict()["dropped"]
    assert pooled.extra["users_out_of_order"] == 2


def test_many_users_match_reference(tmp_path: Path) -> None:
    """Random events in several files and days vs a plain-Python reference."""
    rng = np.random.default_rng(0)
    rows_all = []
    for d in range(3):
        for f in range(2):
            n = 400
            rows = list(zip(rng.integers(0, 60, n).tolist(), rng.integers(0, 9, n).tolist(),
                            (T0 + rng.integers(0, 3 * DAY, n)).tolist(), ["click"] * n))
            rows += rows[:5]  # exact duplicates, later in arrival order
            write_events(tmp_path / "ev" / f"day=2026-01-0{d + 1}" / f"part-{f:05d}.parquet", rows)
            rows_all += rows
    ref: dict[int, list] = {}
    seen = set()
    for arrival, (u, i, t, _e) in enumerate(rows_all):
        if (u, i, t) in seen:
            continue
        seen.add((u, i, t))
        ref.setdefault(u, []).append((t, arrival, i))
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", shards=3, partitions=7, workers=1, min_items=2)
    got = read_sequences(tmp_path / "out")
    want = {u: ([i for _, _, i in sorted(v)], [t for t, _, _ in sorted(v)]) for u, v in ref.items() if len(v) >= 2}
    assert got == want
    d = report.to_dict()
    assert d["dropped"]["duplicate"] == len(rows_all) - sum(len(v) for v in ref.values())
    assert balanced(d)


# ---------------------------------------------------------------------------- bad input


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    f = write_events(tmp_path / "ev" / "x.parquet", [], columns={"user_id": [1], "item_id": [2], "event_type": ["click"]})
    with pytest.raises(DataError, match=r"x\.parquet: missing column 'ts'"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1)
    assert f.exists()


def _cols(user_id: pa.Array) -> dict:
    n = len(user_id)
    return {"user_id": user_id, "item_id": pa.array([7] * n), "ts": pa.array([T0 + k for k in range(n)]),
            "event_type": pa.array(["click"] * n)}


def test_string_user_id_is_an_error(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [], columns=_cols(pa.array(["1", "2"])), schema=pa.schema(
        [("user_id", pa.string()), ("item_id", pa.int64()), ("ts", pa.int64()), ("event_type", pa.string())]))
    with pytest.raises(DataError, match=r"a\.parquet: column 'user_id' has type string, expected int64"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1)


def test_int32_and_timestamp_columns_are_cast(tmp_path: Path) -> None:
    schema = pa.schema([("user_id", pa.int32()), ("item_id", pa.uint16()), ("ts", pa.timestamp("ms", tz="UTC")),
                        ("event_type", pa.large_string())])
    cols = {"user_id": pa.array([5, 5], pa.int32()), "item_id": pa.array([1, 2], pa.uint16()),
            "ts": pa.array([(T0 + 1) * 1000 + 999, (T0 + 2) * 1000], pa.timestamp("ms", tz="UTC")),
            "event_type": pa.array(["click", "click"], pa.large_string())}
    write_events(tmp_path / "ev" / "a.parquet", [], columns=cols, schema=schema)
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1).to_dict()
    assert read_sequences(tmp_path / "out") == {5: ([1, 2], [T0 + 1, T0 + 2])}
    assert "ts" in report["casts"] and report["dropped"] == {}


def test_float_ids(tmp_path: Path) -> None:
    schema = pa.schema([("user_id", pa.float64()), ("item_id", pa.int64()), ("ts", pa.int64()), ("event_type", pa.string())])
    write_events(tmp_path / "ok" / "a.parquet", [], columns=_cols(pa.array([3.0, 3.0, float("nan")])), schema=schema)
    report = sessionize_events(tmp_path / "ok", tmp_path / "out", workers=1).to_dict()
    assert report["casts"]["user_id"] == "double -> int64 (integral values)"
    assert report["dropped"] == {"null_user_id": 1}  # NaN is a null
    assert read_sequences(tmp_path / "out") == {3: ([7, 7], [T0, T0 + 1])}
    write_events(tmp_path / "bad" / "b.parquet", [], columns=_cols(pa.array([3.0, 3.5])), schema=schema)
    with pytest.raises(DataError, match=r"b\.parquet: column 'user_id' \(double\) has non-integral values"):
        sessionize_events(tmp_path / "bad", tmp_path / "out2", workers=1)


def test_null_and_negative_ids(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [
        (1, 1, T0, "click"), (None, 1, T0, "click"), (1, None, T0 + 1, "click"), (1, 2, None, "click"),
        (1, 3, T0 + 2, None), (-4, 1, T0, "click"), (2, -1, T0, "click"), (2, 5, T0 + 3, "click"),
    ])
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1).to_dict()
    assert report["dropped"] == {"null_user_id": 1, "null_item_id": 1, "null_ts": 1, "null_event_type": 1,
                                 "negative_user_id": 1, "negative_item_id": 1}
    assert read_sequences(tmp_path / "out") == {1: ([1], [T0]), 2: ([5], [T0 + 3])}
    assert balanced(report)
    with pytest.raises(DataError, match=r"a\.parquet: 1 row\(s\) with a null user_id in column 'user_id'.*strict"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1, strict=True)


def test_negative_ids_strict(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [(1, 1, T0, "click"), (1, -9, T0, "click")])
    with pytest.raises(DataError, match=r"negative item_id in column 'item_id' \(e\.g\. -9\)"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1, strict=True)


def test_unknown_items_vs_catalogue(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [(1, 1, T0, "click"), (1, 99, T0 + 1, "click"), (1, 2, T0 + 2, "click")])
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}), items)
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", items=items, workers=1).to_dict()
    assert report["dropped"] == {"unknown_item": 1}
    assert report["catalogue"]["items"] == 3
    assert read_sequences(tmp_path / "out") == {1: ([1, 2], [T0, T0 + 2])}
    with pytest.raises(DataError, match=r"item_id missing from the catalogue.*e\.g\. 99"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", items=items, workers=1, strict=True)
    pq.write_table(pa.table({"item_id": [1, 1], "title": ["a", "b"]}), items)
    with pytest.raises(DataError, match="duplicated id"):
        sessionize_events(tmp_path / "ev", tmp_path / "out", items=items, workers=1)


def test_duplicates(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [
        (1, 1, T0, "click"), (1, 2, T0, "click"), (1, 1, T0, "click"), (1, 1, T0, "conversion"), (1, 1, T0 + 5, "click"),
    ])
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", event_types=["click", "conversion"], workers=1).to_dict()
    assert report["dropped"] == {"duplicate": 1}
    assert read_sequences(tmp_path / "out") == {1: ([1, 2, 1, 1], [T0, T0, T0, T0 + 5])}
    with pytest.raises(DataError, match=r"1 exact duplicate event.*user_id=1 item_id=1 ts="):
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1, strict=True)


def test_out_of_order_sorted_and_counted_even_strict(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [(1, 1, T0 + 9, "click"), (1, 2, T0 + 1, "click"), (2, 3, T0, "click")])
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1, strict=True).to_dict()
    assert report["users_out_of_order"] == 1 and report["repaired"] == {"users_out_of_order": 1}
    assert read_sequences(tmp_path / "out")[1] == ([2, 1], [T0 + 1, T0 + 9])


def test_min_items(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [(1, 1, T0, "click"), (2, 1, T0, "click"), (2, 2, T0 + 1, "click"),
                                                 (3, 5, T0, "click"), (3, 5, T0, "click")])  # 3: one item once deduped
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1, min_items=2, strict=False).to_dict()
    assert report["dropped"] == {"min_items": 2, "duplicate": 1}
    assert report["users_dropped_min_items"] == 2 and report["users_out"] == 1
    assert list(read_sequences(tmp_path / "out")) == [2]
    assert balanced(report)


def test_empty_folder_and_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files under"):
        sessionize_events(tmp_path / "empty", tmp_path / "out", workers=1)
    bad = tmp_path / "ev" / "day=2026-01-01" / "part-00000.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not parquet at all, just some bytes" * 3)
    with pytest.raises(DataError, match=r"cannot read Parquet file .*part-00000\.parquet") as info:
        sessionize_events(tmp_path / "ev", tmp_path / "out", workers=1)
    assert "\n" not in str(info.value)


def test_all_rows_filtered_writes_empty_shards(tmp_path: Path) -> None:
    write_events(tmp_path / "ev" / "a.parquet", [(1, 1, T0, "conversion")])
    report = sessionize_events(tmp_path / "ev", tmp_path / "out", shards=2, workers=1).to_dict()
    assert report["users_out"] == 0
    assert [pq.read_table(f).num_rows for f in sorted((tmp_path / "out").glob("part-*.parquet"))] == [0, 0]


def test_out_inside_events_is_refused(events: Path) -> None:
    with pytest.raises(DataError, match="must not be inside the events folder"):
        sessionize_events(events, events / "sequences", workers=1)


def test_splitmix64_is_fixed() -> None:
    # splitmix64's first output from state 0 (the reference C implementation).
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    assert user_shard(np.array([0, 1, 2, 3]), 8).tolist() == (splitmix64(np.arange(4)) % np.uint64(8)).astype(int).tolist()


# ---------------------------------------------------------------------------- CLI


def test_cli_good_and_bad(events: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "seq"
    assert main(["data", "sessionize", "--events", str(events), "--out", str(out), "--shards", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "users_out: 3" in printed and "rows_in: 11" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    assert (out / "config.yaml").exists() and not (out / "_sessionize_tmp").exists()
    assert len(list(out.glob("part-*.parquet"))) == 2
    # Re-running with fewer shards replaces the stale files.
    assert main(["data", "sessionize", "--events", str(events), "--out", str(out), "--shards", "1", "--workers", "1"]) == 0
    assert len(list(out.glob("part-*.parquet"))) == 1
    capsys.readouterr()

    write_events(tmp_path / "bad" / "a.parquet", [], columns={"user_id": [1], "item_id": [2], "event_type": ["click"]})
    rc = main(["data", "sessionize", "--events", str(tmp_path / "bad"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "missing column 'ts'" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0

    write_events(tmp_path / "nulls" / "a.parquet", [(None, 1, T0, "click"), (1, 1, T0, "click")])
    rc = main(["data", "sessionize", "--events", str(tmp_path / "nulls"), "--out", str(tmp_path / "o3"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "null user_id" in err and err.strip().count("\n") == 0
