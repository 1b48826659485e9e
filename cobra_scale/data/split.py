"""Train / validation / test splits of per-user sequences, computed shard by shard.

Two protocols:

* **Leave-one-out** (``kind="loo"``, the public benchmarks' protocol): per user, the last
  item is the test target, the second-to-last the validation target, the rest is
  training. Users with fewer than 3 items are dropped (and counted). ``drop_last=N`` first
  removes each sequence's last N items: with N = 1 the test rows are the usual validation
  rows, and a model chosen on them is chosen in the usual test's position.
* **Leave-one-out with cold-start items** (``kind="loo_cold"``): a seeded fraction of the
  items that are some user's test target become *cold-start items*: every interaction
  with them is removed from the sequences except where one is a user's last item (a
  test target), then leave-one-out runs on what is left. Cold items never reach
  training or validation (their text and IDs are known, their interactions are not);
  ``cold_items.parquet`` lists them, and test rows whose target is cold form the
  cold-start segment.
* **Time split** (``kind="time"``, the paper's industrial setup): events before
  ``valid_day`` are training; the validation rows predict the items of ``valid_day``
  from the history before it; the test rows predict the items of ``test_day`` from the
  history before it (which includes ``valid_day``).

Outputs (``out/{train,valid,test}/part-SSSSS.parquet``):

* ``train``: :data:`SEQUENCES_SCHEMA`, the full training part of each user's sequence.
  The trainer cuts it into examples whose histories are truncated to the last
  ``max_history`` items (see :func:`training_examples`).
* ``valid`` / ``test``: :data:`EXAMPLES_SCHEMA` rows, ``history`` = last ``max_history``
  items, ``targets`` = the held-out item(s), each distinct item once, in time order.

Everything is vectorised over a shard with numpy offsets; memory is one shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from cobra_scale.config import save_config
from cobra_scale.data.configs import SplitConfig
from cobra_scale.data.io import list_parquet_files, open_parquet, shard_name, write_table
from cobra_scale.data.schemas import EXAMPLES_SCHEMA, SECONDS_PER_DAY, SEQUENCES_SCHEMA, day_of, day_start

from cobra_scale.errors import DataError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- list helpers


def _list_parts(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, offsets, null_mask)`` of a list column, offsets rebased to 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ChunkedArray):  # combine_chunks of a 0-chunk array
        arr = pa.array([], type=column.type)
    nulls = np.asarray(arr.is_null(), dtype=bool)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values, dtype=np.int64) if len(arr.values) else np.zeros(0, np.int64)
    values = values[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    return values, offsets, nulls


def take_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``values[starts[i]:ends[i]]`` for every row ``i`` without a Python loop.

    Returns:
        ``(flat_values, offsets)`` with ``offsets`` of length ``len(starts) + 1``.
    """
    lengths = np.maximum(ends - starts, 0)
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # index of element j of row i is starts[i] + j
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return values[idx], offsets


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets), pa.array(values, pa.int64()))


def _dedupe_in_rows(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first occurrence of each value inside each row, preserving order."""
    if len(values) == 0:
        return values, offsets
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pos = np.arange(len(values))
    order = np.lexsort((pos, values, rows))  # by row, then value, then position
    first = np.ones(len(values), dtype=bool)
    first[1:] = (rows[order][1:] != rows[order][:-1]) | (values[order][1:] != values[order][:-1])
    keep = np.sort(order[first])
    counts = np.bincount(rows[keep], minlength=len(offsets) - 1)
    new_offsets = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    return values[keep], new_offsets


# ----------------------------------------------------------------------------- protocols


def split_loo(table: pa.Table, max_history: int, drop_last: int = 0) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """Leave-one-out split of a sequences table (each sequence without its last ``drop_last`` items).

    Returns:
        ``(train, valid, test, counts)``: train in SEQUENCES_SCHEMA, valid/test in
        EXAMPLES_SCHEMA, counts of kept and dropped users.
    """
    items, offsets, _ = _list_parts(table.column("item_ids"))
    has_ts = table.column("timestamps").null_count < table.num_rows
    ts, ts_offsets, ts_null = _list_parts(table.column("timestamps")) if has_ts else (None, None, None)
    lengths = np.diff(offsets) - drop_last
    keep = lengths >= 3
    users = np.asarray(table.column("user_id"), dtype=np.int64)[keep]
    starts, ends = offsets[:-1][keep], offsets[1:][keep] - drop_last

    def examples(hist_end: np.ndarray) -> pa.Table:
        hist_start = np.maximum(starts, hist_end - max_history)
        h_vals, h_off = take_ranges(items, hist_start, hist_end)
        t_vals, t_off = take_ranges(items, hist_end, hist_end + 1)
        cols = {
            "user_id": pa.array(users, pa.int64()),
            "history": _list_array(h_vals, h_off),
            "history_ts": _list_array(*take_ranges(ts, hist_start, hist_end)) if has_ts else pa.nulls(len(users), pa.list_(pa.int64())),
            "targets": _list_array(t_vals, t_off),
        }
        return pa.table(cols, schema=EXAMPLES_SCHEMA)

    tr_vals, tr_off = take_ranges(items, starts, ends - 2)
    train = pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_ids": _list_array(tr_vals, tr_off),
            "timestamps": _list_array(*take_ranges(ts, starts, ends - 2)) if has_ts else pa.nulls(len(users), pa.list_(pa.int64())),
        },
        schema=SEQUENCES_SCHEMA,
    )
    counts = {"users_in": table.num_rows, "users_out": int(keep.sum()), "dropped_users_fewer_than_3_items": int((~keep).sum())}
    return train, examples(ends - 2), examples(ends - 1), counts


def remove_cold(table: pa.Table, cold: np.ndarray) -> tuple[pa.Table, int]:
    """Drop the items in ``cold`` (sorted ids) from every position but the last of each row.

    Returns the filtered sequences table and the number of interactions removed.
    """
    items, offsets, _ = _list_parts(table.column("item_ids"))
    has_ts = table.column("timestamps").null_count < table.num_rows
    is_last = np.zeros(len(items), dtype=bool)
    nonempty = np.diff(offsets) > 0
    is_last[offsets[1:][nonempty] - 1] = True
    pos = np.searchsorted(cold, items).clip(max=max(len(cold) - 1, 0))
    is_cold = (cold[pos] == items) if len(cold) else np.zeros(len(items), dtype=bool)
    keep = ~is_cold | is_last
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    new_offsets = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=len(offsets) - 1), out=new_offsets[1:])
    cols = {"user_id": table.column("user_id"), "item_ids": _list_array(items[keep], new_offsets)}
    if has_ts:
        ts, _, _ = _list_parts(table.column("timestamps"))
        cols["timestamps"] = _list_array(ts[keep], new_offsets)
    else:
        cols["timestamps"] = pa.nulls(table.num_rows, pa.list_(pa.int64()))
    return pa.table(cols, schema=SEQUENCES_SCHEMA), int((~keep).sum())


def draw_cold_items(files: list[Path], fraction: float, seed: int) -> tuple[np.ndarray, int]:
    """A seeded ``fraction`` of the distinct last items (test targets) of all sequences.

    Returns ``(cold item ids sorted, number of distinct test-target items)``.
    """
    last = []
    for f in files:
        items, offsets, _ = _list_parts(open_parquet(f).read(columns=["item_ids"]).column("item_ids"))
        lengths = np.diff(offsets)
        last.append(items[offsets[1:][lengths >= 3] - 1])
    targets = np.unique(np.concatenate(last)) if last else np.zeros(0, np.int64)
    n = int(round(fraction * len(targets)))
    if n == 0:
        raise DataError(f"cold_fraction={fraction} of {len(targets)} test-target items selects no cold-start item")
    pick = np.random.default_rng(seed).choice(len(targets), n, replace=False)
    return np.sort(targets[pick]), len(targets)


def split_time(table: pa.Table, max_history: int, valid_start: int, test_start: int) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """Time split of a sequences table at Unix-second boundaries.

    train = events before ``valid_start``; valid targets = the day starting at
    ``valid_start`` (history before it); test targets = the day starting at ``test_start``
    (history before it). Rows without history or without targets are omitted.
    """
    if table.column("timestamps").null_count == table.num_rows and table.num_rows:
        raise DataError("time split needs timestamps; these sequences have none (use kind=loo)")
    items, offsets, _ = _list_parts(table.column("item_ids"))
    ts, _, _ = _list_parts(table.column("timestamps"))
    users_all = np.asarray(table.column("user_id"), dtype=np.int64)
    n_rows = len(offsets) - 1

    def count_before(bound: int) -> np.ndarray:
        # timestamps are sorted within a row, so "how many < bound" is the split point
        flags = (ts < bound).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(flags)])
        return csum[offsets[1:]] - csum[offsets[:-1]]

    starts = offsets[:-1]
    n_before_valid = count_before(valid_start)
    n_before_valid_end = count_before(valid_start + SECONDS_PER_DAY)
    n_before_test = count_before(test_start)
    n_before_test_end = count_before(test_start + SECONDS_PER_DAY)

    def examples(hist_len: np.ndarray, tgt_end_len: np.ndarray) -> tuple[pa.Table, int]:
        hist_end = starts + hist_len
        tgt_vals, tgt_off = take_ranges(items, hist_end, starts + tgt_end_len)
        tgt_vals, tgt_off = _dedupe_in_rows(tgt_vals, tgt_off)
        ok = (hist_len > 0) & (np.diff(tgt_off) > 0)
        rows = np.flatnonzero(ok)
        hist_start = np.maximum(starts, hist_end - max_history)[rows]
        h_vals, h_off = take_ranges(items, hist_start, hist_end[rows])
        hts_vals, hts_off = take_ranges(ts, hist_start, hist_end[rows])
        t_vals, t_off = take_ranges(tgt_vals, tgt_off[:-1][rows], tgt_off[1:][rows])
        no_history = int(((hist_len == 0) & (np.diff(tgt_off) > 0)).sum())
        tbl = pa.table(
            {
                "user_id": pa.array(users_all[rows], pa.int64()),
                "history": _list_array(h_vals, h_off),
                "history_ts": _list_array(hts_vals, hts_off),
                "targets": _list_array(t_vals, t_off),
            },
            schema=EXAMPLES_SCHEMA,
        )
        return tbl, no_history

    train_rows = np.flatnonzero(n_before_valid > 0)
    tr_vals, tr_off = take_ranges(items, starts[train_rows], starts[train_rows] + n_before_valid[train_rows])
    trts_vals, trts_off = take_ranges(ts, starts[train_rows], starts[train_rows] + n_before_valid[train_rows])
    train = pa.table(
        {"user_id": pa.array(users_all[train_rows], pa.int64()), "item_ids": _list_array(tr_vals, tr_off), "timestamps": _list_array(trts_vals, trts_off)},
        schema=SEQUENCES_SCHEMA,
    )
    valid, valid_cold = examples(n_before_valid, n_before_valid_end)
    test, test_cold = examples(n_before_test, n_before_test_end)
    counts = {
        "users_in": n_rows,
        "train_users": len(train_rows),
        "valid_users": valid.num_rows,
        "test_users": test.num_rows,
        "valid_users_without_history": valid_cold,
        "test_users_without_history": test_cold,
        "events_after_test_day": int((np.diff(offsets) - n_before_test_end).sum()),
    }
    return train, valid, test, counts


def training_examples(item_ids: list[int], max_history: int) -> Iterator[tuple[list[int], int]]:
    """Every ``(history, target)`` prefix example of one training sequence.

    The protocol of the public benchmarks: every prefix of the training part is an
    example, its history truncated to the last ``max_history`` items.

        >>> list(training_examples([1, 2, 3], max_history=1))
        [([1], 2), ([2], 3)]
    """
    for t in range(1, len(item_ids)):
        yield item_ids[max(0, t - max_history) : t], item_ids[t]


# ----------------------------------------------------------------------------- command


def _time_bounds(files: list[Path], cfg: SplitConfig) -> tuple[str, str]:
    test_day = cfg.test_day
    if test_day is None:
        latest = None
        for f in files:
            col = open_parquet(f).read(columns=["timestamps"]).column("timestamps")
            flat = pc.list_flatten(col)
            if len(flat):
                m = pc.max(flat).as_py()
                latest = m if latest is None else max(latest, m)
        if latest is None:
            raise DataError("time split: the sequences hold no timestamps")
        test_day = day_of(latest)
    valid_day = cfg.valid_day or day_of(day_start(test_day) - SECONDS_PER_DAY)
    if day_start(valid_day) >= day_start(test_day):
        raise DataError(f"valid_day ({valid_day}) must be before test_day ({test_day})")
    return valid_day, test_day


def split_files(cfg: SplitConfig) -> dict:
    """Split every sequences file under ``cfg.sequences`` into ``cfg.out/{train,valid,test}``."""
    files = list_parquet_files(cfg.sequences)
    out = Path(cfg.out)
    totals: dict[str, int] = {}
    extra: dict[str, str] = {}
    cold = None
    if cfg.kind == "time":
        valid_day, test_day = _time_bounds(files, cfg)
        extra = {"valid_day": valid_day, "test_day": test_day}
    elif cfg.kind == "loo_cold":
        cold, n_targets = draw_cold_items(files, cfg.cold_fraction, cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        write_table(pa.table({"item_id": pa.array(cold, pa.int64())}), out / "cold_items.parquet")
        totals = {"test_target_items": n_targets, "cold_items": len(cold)}
    for index, f in enumerate(tqdm(files, desc=f"split ({cfg.kind})", unit="shard", disable=len(files) < 2)):
        table = open_parquet(f).read()
        from cobra_scale.data.validate import check_sequences_table

        table = check_sequences_table(table, f)
        if cfg.kind == "loo":
            train, valid, test, counts = split_loo(table, cfg.max_history, cfg.drop_last)
        elif cfg.kind == "loo_cold":
            table, removed = remove_cold(table, cold)
            train, valid, test, counts = split_loo(table, cfg.max_history)
            tgt, _, _ = _list_parts(test.column("targets"))
            pos = np.searchsorted(cold, tgt).clip(max=len(cold) - 1)
            counts = {**counts, "cold_interactions_removed": removed, "test_users_cold_target": int((cold[pos] == tgt).sum())}
        else:
            train, valid, test, counts = split_time(table, cfg.max_history, day_start(extra["valid_day"]), day_start(extra["test_day"]))
        for name, part in (("train", train), ("valid", valid), ("test", test)):
            write_table(part, out / name / shard_name(index))
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + int(v)
    summary = {"kind": cfg.kind, **({"drop_last": cfg.drop_last} if cfg.drop_last else {}), **extra, **totals, "out": str(out)}
    save_config(cfg, out)
    (out / "split_report.json").write_text(json.dumps(summary, indent=2))
    for key, value in totals.items():
        if key.startswith("dropped") and value:
            log.warning("split: %s = %d", key, value)
    return summary


def run(cfg: SplitConfig) -> dict:
    return split_files(cfg)
