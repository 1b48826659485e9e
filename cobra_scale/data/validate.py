"""Validation of external input: one policy for every table the data layer reads.

Used by ``cobra data sessionize`` (events, catalogue) and by
``cobra data validate --path P --table events|items|sequences|examples [--items CATALOGUE]``.

Policy
======

**Structural problems are errors.** They stop the command with a one-line
:class:`~cobra_scale.errors.DataError` (CLI exit status 2) naming the file, the column
and what is wrong:

* an unreadable or corrupt file (not Parquet, truncated, bad page);
* a missing required column (optional columns — ``value`` of events, ``timestamps`` of
  sequences, ``brand``/``categories``/``price``/``description`` of items, ``history_ts``
  of examples — may be absent);
* a column whose type cannot be cast safely: string / boolean / binary ids or
  timestamps, float ids or timestamps with a fractional part or an infinity, unsigned
  ids above the int64 range, a list column that is not a list of integers;
* the same column twice in one file;
* duplicated ``item_id`` in an items table (which row is the item is ambiguous).

Safe casts are applied and reported (``casts`` in the report, one log line each):
integers of any width -> int64; timestamp-typed time columns (``ts``, ``timestamps``,
``history_ts``) -> int64 Unix seconds (floored); float ids / timestamps whose values
are all integral -> int64 (a NaN is a null); large/dictionary strings -> string;
numeric ``value``/``price`` -> their float type; large lists and lists of narrower
integers -> ``list<int64>``; an all-null column -> its expected type. Extra columns
are ignored. :func:`check_schema` is the one place that decides this.

**Row-level problems are repaired by default**; every repair is counted in the report
(the dict the command returns, ``report.json`` next to its outputs, one log line per
kind). With ``strict=True`` (``--strict``) any row-level *loss* is instead an error
naming the file, the column and the count.

* events: rows with a null ``user_id``/``item_id``/``ts``/``event_type`` (dropped:
  ``null_<column>``); negative ``user_id``/``item_id`` (``negative_<column>``); an
  ``item_id`` missing from the catalogue, only when a catalogue is given
  (``unknown_item``); exact duplicate events — same ``user_id, item_id, ts,
  event_type`` — keep the first in arrival order (``duplicate``);
* items: null or negative ``item_id``; null or blank ``title`` (``missing_title``).
  Null optional fields are fine;
* sequences / examples: rows with a null or negative ``user_id``; a null list; a
  timestamps list whose length differs from its ids list
  (``<ts column>_length_mismatch``); list *elements* that are null, negative or not in
  the catalogue are removed (counted under ``removed``, with their timestamps); rows
  whose list is then empty are dropped (``empty_<column>``).

Repairs that lose nothing are always applied and counted, also under ``strict``:
events whose arrival order is not time order are sorted by ``(ts, arrival order)``
(``users_out_of_order`` counts the users affected); list rows whose timestamps
decrease are sorted by timestamp (``unsorted_<ts column>`` counts rows).

Filters the user asked for are counted as drops but are never errors: events of
types outside ``event_types`` (``event_type``) and users left with fewer than
``min_items`` items (``min_items`` counts their events, ``users_dropped_min_items``
the users).

**Nothing is lost silently:** every report satisfies
``rows_in == rows_out + sum(dropped.values())`` (:meth:`Report.check_balance`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cobra_scale.errors import DataError

log = logging.getLogger(__name__)

# Columns a file must have, per table (the rest of the schema is optional).
REQUIRED: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "item_id", "ts", "event_type"),
    "items": ("item_id", "title"),
    "sequences": ("user_id", "item_ids"),
    "examples": ("user_id", "history", "targets"),
}

# Columns holding times: the only ones a timestamp type may be cast from.
TIME_COLUMNS = frozenset({"ts", "timestamps", "history_ts"})

# Drops that are the user's own choice: counted, never an error under strict.
FILTER_REASONS = frozenset({"event_type", "min_items"})

_DESCRIBE = {
    "null_user_id": "a null user_id",
    "null_item_id": "a null item_id",
    "null_ts": "a null ts",
    "null_event_type": "a null event_type",
    "negative_user_id": "a negative user_id",
    "negative_item_id": "a negative item_id",
    "unknown_item": "an item_id missing from the catalogue",
    "duplicate": "exact duplicates (same user_id, item_id, ts, event_type)",
    "missing_title": "a null or blank title",
    "event_type": "an event type not in event_types",
    "min_items": "events of users with fewer than min_items items",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class CastAction:
    """How one column of a file is brought to its expected type.

    ``kind`` is one of ``int`` (integer width), ``float_integral`` (float ids, checked
    integral on every batch), ``timestamp`` (-> Unix seconds), ``string``, ``float``,
    ``null`` (all-null column) or ``list`` (``inner`` says how the values are cast).
    """

    column: str
    source: pa.DataType
    target: pa.DataType
    kind: str
    inner: Optional[str] = None

    def describe(self) -> str:
        note = {"float_integral": " (integral values)", "timestamp": " (Unix seconds)"}.get(self.inner or self.kind, "")
        return f"{_type_str(self.source)} -> {_type_str(self.target)}{note}"


def _type_str(t: pa.DataType) -> str:
    """``list<int64>`` whatever the list's child field is called (Parquet says 'element')."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{'large_list' if pa.types.is_large_list(t) else 'list'}<{_type_str(t.value_type)}>"
    return str(t)


def _cast_kind(src: pa.DataType, dst: pa.DataType, column: str) -> Optional[str]:
    """The kind of a safe cast from ``src`` to ``dst``, or None when there is none."""
    if pa.types.is_null(src):
        return "null"
    if pa.types.is_integer(dst):
        if pa.types.is_integer(src):
            return "int"
        if pa.types.is_floating(src):
            return "float_integral"
        if pa.types.is_timestamp(src) and column in TIME_COLUMNS:
            return "timestamp"
        return None
    if pa.types.is_string(dst):
        if pa.types.is_string(src) or pa.types.is_large_string(src) or getattr(pa.types, "is_string_view", lambda t: False)(src):
            return "string"
        if pa.types.is_dictionary(src) and (pa.types.is_string(src.value_type) or pa.types.is_large_string(src.value_type)):
            return "string"
        return None
    if pa.types.is_floating(dst):
        if pa.types.is_floating(src) or pa.types.is_integer(src) or pa.types.is_decimal(src):
            return "float"
        return None
    if pa.types.is_list(dst):
        if pa.types.is_list(src) or pa.types.is_large_list(src):
            inner = _cast_kind(src.value_type, dst.value_type, column)
            if inner is None:
                return None
            return "list"
        return None
    return None


def check_schema(
    schema_of_file: pa.Schema,
    expected: pa.Schema,
    file: str | os.PathLike,
    required: Optional[Iterable[str]] = None,
) -> list[CastAction]:
    """Check a file's schema against ``expected``; return the casts it needs.

    Args:
        schema_of_file: the Arrow schema of the file (``ParquetFile.schema_arrow``).
        expected: the table's schema (:mod:`cobra_scale.data.schemas`).
        file: named in error messages.
        required: columns that must be present (default: all of ``expected``).

    Returns:
        one :class:`CastAction` per present column whose type differs (empty when the
        file matches exactly). Apply them with :func:`apply_casts`.

    Raises:
        DataError: a required column is missing, a column appears twice, or its type
            cannot be cast safely (see the module policy).
    """
    required = set(expected.names if required is None else required)
    actions: list[CastAction] = []
    for f in expected:
        where = schema_of_file.get_all_field_indices(f.name)
        if len(where) > 1:
            raise DataError(f"{file}: column '{f.name}' appears {len(where)} times")
        if not where:
            if f.name in required:
                have = ", ".join(schema_of_file.names) or "none"
                raise DataError(f"{file}: missing column '{f.name}' ({f.type}); the file has: {have}")
            continue
        src = schema_of_file.field(where[0]).type
        if src.equals(f.type):
            continue
        kind = _cast_kind(src, f.type, f.name)
        if kind is None:
            raise DataError(f"{file}: column '{f.name}' has type {_type_str(src)}, expected {_type_str(f.type)} (no safe cast)")
        inner = _cast_kind(src.value_type, f.type.value_type, f.name) if kind == "list" else None
        actions.append(CastAction(f.name, src, f.type, kind, inner))
    return actions


def _cast_values(arr: pa.Array, kind: str, target: pa.DataType, column: str, file: Any) -> pa.Array:
    """Cast one (non-chunked) array; value problems become a DataError."""
    try:
        if kind == "null":
            return pa.nulls(len(arr), target)
        if kind == "int":
            return pc.cast(arr, target, safe=True)
        if kind == "float_integral":
            if not pa.types.is_floating(arr.type):  # (inside lists the source may differ)
                return pc.cast(arr, target, safe=True)
            if len(arr) and pc.any(pc.is_inf(arr)).as_py():
                raise DataError(f"{file}: column '{column}' ({arr.type}) holds an infinite value; ids and times must be integers")
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
            return pc.cast(arr, target, safe=True)
        if kind == "timestamp":
            unit_s = pa.timestamp("s", getattr(arr.type, "tz", None))
            return pc.cast(pc.cast(arr, unit_s, safe=False), target)
        if kind == "string":
            if pa.types.is_dictionary(arr.type):
                arr = arr.dictionary_decode()
            return pc.cast(arr, target)
        if kind == "float":
            return pc.cast(arr, target, safe=False)
    except DataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        what = "non-integral values" if kind == "float_integral" else "values that do not fit"
        raise DataError(f"{file}: column '{column}' ({arr.type}) has {what}: {_first_line(exc)}") from exc
    raise ValueError(f"unknown cast kind {kind!r}")


def _cast_array(arr: pa.Array, action: CastAction, file: Any) -> pa.Array:
    if action.kind != "list":
        return _cast_values(arr, action.kind, action.target, action.column, file)
    offsets = arr.offsets
    if pa.types.is_large_list(arr.type):
        if len(offsets) and offsets[-1].as_py() > np.iinfo(np.int32).max:
            raise DataError(f"{file}: column '{action.column}' holds more than 2^31 list values in one batch")
        offsets = pc.cast(offsets, pa.int32())
    values = _cast_values(arr.values, action.inner or "int", action.target.value_type, action.column, file)
    mask = arr.is_null() if arr.null_count else None
    return pa.ListArray.from_arrays(offsets, values, type=action.target, mask=mask)


def apply_casts(table: pa.Table | pa.RecordBatch, actions: Sequence[CastAction], file: Any) -> pa.Table:
    """Apply :func:`check_schema`'s actions to a table or record batch.

    Raises:
        DataError: a value cannot be cast (a fractional float id, a uint64 above the
            int64 range, an infinite float), naming the file and column.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    for action in actions:
        idx = table.schema.get_field_index(action.column)
        if idx < 0:
            continue
        col = table.column(idx)
        chunks = [_cast_array(c, action, file) for c in col.chunks]
        new = pa.chunked_array(chunks, type=action.target)
        table = table.set_column(idx, pa.field(action.column, action.target), new)
    return table


# --------------------------------------------------------------------------- report


class Report:
    """Counts of what validation read, kept, dropped and repaired.

    ``dropped`` counts rows by reason; ``removed`` counts list elements (sequences /
    examples) by reason; ``repaired`` counts repairs that lose nothing; ``casts`` maps
    a column to the cast applied to it. ``strict`` turns every row-level loss that is
    not a user-chosen filter into a :class:`DataError`.
    """

    def __init__(self, table: str, strict: bool = False) -> None:
        self.table = table
        self.strict = strict
        self.files = 0
        self.rows_in = 0
        self.rows_out = 0
        self.dropped: dict[str, int] = {}
        self.removed: dict[str, int] = {}
        self.repaired: dict[str, int] = {}
        self.casts: dict[str, str] = {}
        self.extra: dict[str, Any] = {}

    # -- recording
    def drop(self, reason: str, n: int, *, file: Any = None, column: Optional[str] = None, example: Any = None) -> None:
        """Count ``n`` rows dropped for ``reason``; under strict, raise instead."""
        n = int(n)
        if n <= 0:
            return
        if self.strict and reason not in FILTER_REASONS:
            self._strict_error(f"{n} row(s) with {_DESCRIBE.get(reason, reason)}", file, column, example)
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def remove(self, reason: str, n: int, *, file: Any = None, column: Optional[str] = None, example: Any = None) -> None:
        """Count ``n`` list elements removed for ``reason``; under strict, raise instead."""
        n = int(n)
        if n <= 0:
            return
        if self.strict:
            self._strict_error(f"{n} list element(s): {reason}", file, column, example)
        self.removed[reason] = self.removed.get(reason, 0) + n

    def repair(self, reason: str, n: int) -> None:
        """Count a repair that loses nothing (never an error)."""
        n = int(n)
        if n > 0:
            self.repaired[reason] = self.repaired.get(reason, 0) + n

    def cast(self, file: Any, actions: Sequence[CastAction]) -> None:
        for a in actions:
            if a.kind in ("string", "float") and a.column != "ts":
                continue  # lossless representation changes are not worth reporting
            self.casts.setdefault(a.column, a.describe())

    def _strict_error(self, what: str, file: Any, column: Optional[str], example: Any) -> None:
        where = f"{file}: " if file is not None else ""
        col = f" in column '{column}'" if column else ""
        ex = f" (e.g. {example})" if example is not None else ""
        raise DataError(f"{where}{what}{col}{ex}; strict mode (without --strict they are repaired and counted)")

    # -- merging (workers send plain dicts)
    def state(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(self.dropped),
            "removed": dict(self.removed),
            "repaired": dict(self.repaired),
            "casts": dict(self.casts),
        }

    def merge(self, state: dict[str, Any]) -> None:
        self.files += state.get("files", 0)
        self.rows_in += state.get("rows_in", 0)
        self.rows_out += state.get("rows_out", 0)
        for name in ("dropped", "removed", "repaired"):
            mine = getattr(self, name)
            for k, v in state.get(name, {}).items():
                mine[k] = mine.get(k, 0) + v
        for k, v in state.get("casts", {}).items():
            self.casts.setdefault(k, v)

    # -- output
    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check_balance(self) -> None:
        """``rows_in == rows_out + sum(dropped)``; a mismatch is a bug, never user error."""
        if self.rows_in != self.rows_out + self.dropped_total:
            raise RuntimeError(
                f"row accounting mismatch in {self.table}: rows_in={self.rows_in} != rows_out={self.rows_out}"
                f" + dropped={self.dropped_total} {self.dropped}"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "table": self.table,
            "strict": self.strict,
            "files": self.files,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            # rows_in == rows_out + rows_filtered + rows_dropped; `dropped` lists both kinds by reason
            "rows_filtered": sum(n for r, n in self.dropped.items() if r in FILTER_REASONS),
            "rows_dropped": sum(n for r, n in self.dropped.items() if r not in FILTER_REASONS),
            "dropped": dict(sorted(self.dropped.items())),
        }
        if self.removed or self.table in ("sequences", "examples"):
            out["removed"] = dict(sorted(self.removed.items()))
        out["repaired"] = dict(sorted(self.repaired.items()))
        out["casts"] = dict(sorted(self.casts.items()))
        out.update(self.extra)
        return out

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        os.replace(tmp, path)
        return path

    def log_summary(self, logger: logging.Logger = log) -> None:
        """One log line per drop reason, element removal, repair and cast."""
        for reason, n in sorted(self.dropped.items()):
            kind = "filtered" if reason in FILTER_REASONS else "dropped"
            logger.info("%s: %s %d row(s): %s", self.table, kind, n, _DESCRIBE.get(reason, reason))
        for reason, n in sorted(self.removed.items()):
            logger.info("%s: removed %d list element(s): %s", self.table, n, reason)
        for reason, n in sorted(self.repaired.items()):
            logger.info("%s: repaired %s: %d", self.table, reason, n)
        for column, what in sorted(self.casts.items()):
            logger.info("%s: cast column '%s': %s", self.table, column, what)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------- catalogue


class Catalogue:
    """Sorted unique item ids with a fast vectorised membership test.

    Dense id spaces use a boolean lookup table (built lazily, never pickled); sparse
    ones a binary search.
    """

    _MAX_TABLE = 1 << 28

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))
        self._table: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.ids.size)

    def __getstate__(self) -> dict:
        return {"ids": self.ids}

    def __setstate__(self, state: dict) -> None:
        self.ids = state["ids"]
        self._table = None

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``x`` are catalogue ids."""
        x = np.asarray(x, dtype=np.int64)
        if self.ids.size == 0:
            return np.zeros(x.shape, dtype=bool)
        hi = int(self.ids[-1])
        if self.ids[0] >= 0 and hi < max(16 * self.ids.size, 1 << 20) and hi < self._MAX_TABLE:
            if self._table is None:
                table = np.zeros(hi + 2, dtype=bool)  # last slot: "out of range" -> False
                table[self.ids] = True
                self._table = table
            return self._table[np.clip(x, -1, hi + 1)]  # -1 wraps to the last slot (False)
        idx = np.searchsorted(self.ids, x)
        np.minimum(idx, self.ids.size - 1, out=idx)
        return self.ids[idx] == x


def load_catalogue(path: str | os.PathLike, report: Optional[Report] = None) -> Catalogue:
    """The item ids of an items table (file or folder), for membership checks.

    Null and negative ids are dropped and counted in ``report`` (when given);
    duplicated ids are an error (see :func:`validate_items`).
    """
    from cobra_scale.data.io import list_parquet_files, open_parquet
    from cobra_scale.data.schemas import ITEMS_SCHEMA

    expected = pa.schema([ITEMS_SCHEMA.field("item_id")])
    parts = []
    rep = report if report is not None else Report("items")
    for f in list_parquet_files(path):
        pf = open_parquet(f)
        actions = check_schema(pf.schema_arrow, expected, f)
        try:
            table = pf.read(columns=["item_id"])
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read Parquet file {f}: {_first_line(exc)}") from exc
        table = apply_casts(table, actions, f)
        rep.cast(f, actions)
        col = table.column("item_id")
        rep.rows_in += len(col)
        if col.null_count:
            rep.drop("null_item_id", col.null_count, file=f, column="item_id")
            col = col.drop_null()
        ids = col.to_numpy()
        neg = ids < 0
        if neg.any():
            rep.drop("negative_item_id", int(neg.sum()), file=f, column="item_id", example=int(ids[neg][0]))
            ids = ids[~neg]
        rep.rows_out += ids.size
        parts.append(ids)
        rep.files += 1
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    cat = Catalogue(ids)
    if len(cat) != ids.size:
        _raise_duplicates(ids, path)
    return cat


def _raise_duplicates(ids: np.ndarray, where: Any) -> None:
    s = np.sort(ids)
    dup = s[1:][s[1:] == s[:-1]]
    n = int(np.unique(dup).size)
    raise DataError(f"{where}: column 'item_id' has {n} duplicated id(s) (e.g. {int(dup[0])}); item ids must be unique")


# --------------------------------------------------------------------------- events


def _int_column(table: pa.Table, name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An int64 column as numpy (nulls filled with 0) and its null mask (None: no nulls)."""
    col = table.column(name)
    if col.null_count:
        valid = _np(col.is_valid()).astype(bool)
        return _np(pc.fill_null(col, 0)), ~valid
    return _np(col), None


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            return col.chunk(0).to_numpy(zero_copy_only=False)
        return col.combine_chunks().to_numpy(zero_copy_only=False)
    return col.to_numpy(zero_copy_only=False)


def clean_events(
    table: pa.Table,
    file: Any,
    report: Report,
    catalogue: Optional[Catalogue] = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Row-level checks of one batch of events (already cast with :func:`apply_casts`).

    Counts ``report.rows_in`` and the drops (null ids / ts / event_type, negative ids,
    unknown items) in that priority order, so each dropped row has exactly one reason.

    Returns:
        ``(keep, columns)``: the boolean mask of good rows and ``user_id``, ``item_id``,
        ``ts`` as int64 numpy arrays over *all* rows (nulls filled with 0). The caller
        adds ``keep.sum()`` (or what it keeps of it) to ``report.rows_out`` eventually.
    """
    n = table.num_rows
    report.rows_in += n
    keep = np.ones(n, dtype=bool)
    cols: dict[str, np.ndarray] = {}
    for name in ("user_id", "item_id", "ts"):
        values, nulls = _int_column(table, name)
        cols[name] = values
        if nulls is not None:
            bad = nulls & keep
            report.drop(f"null_{name}", int(bad.sum()), file=file, column=name)
            keep &= ~nulls
    et = table.column("event_type")
    if et.null_count:
        valid = _np(et.is_valid()).astype(bool)
        bad = ~valid & keep
        report.drop("null_event_type", int(bad.sum()), file=file, column="event_type")
        keep &= valid
    for name in ("user_id", "item_id"):
        neg = cols[name] < 0
        if neg.any():
            bad = neg & keep
            ex = int(cols[name][bad][0]) if bad.any() else None
            report.drop(f"negative_{name}", int(bad.sum()), file=file, column=name, example=ex)
            keep &= ~neg
    if catalogue is not None:
        known = catalogue.contains(cols["item_id"])
        bad = ~known & keep
        if bad.any():
            report.drop("unknown_item", int(bad.sum()), file=file, column="item_id", example=int(cols["item_id"][bad][0]))
            keep &= known
    return keep, cols


# --------------------------------------------------------------------------- items


def validate_items(table: pa.Table, file: Any, report: Report) -> pa.Table:
    """Row-level checks of an items table (already cast); returns the good rows.

    Drops (counted): null / negative ``item_id``, null or blank ``title``.

    Raises:
        DataError: duplicated ``item_id`` among the good rows; under strict, any drop.
    """
    n = table.num_rows
    report.rows_in += n
    keep = np.ones(n, dtype=bool)
    ids, nulls = _int_column(table, "item_id")
    if nulls is not None:
        report.drop("null_item_id", int(nulls.sum()), file=file, column="item_id")
        keep &= ~nulls
    neg = (ids < 0) & keep
    if neg.any():
        report.drop("negative_item_id", int(neg.sum()), file=file, column="item_id", example=int(ids[neg][0]))
        keep &= ~neg
    title = table.column("title")
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(title), ""), True)
    blank_np = _np(blank).astype(bool) & keep
    if blank_np.any():
        report.drop("missing_title", int(blank_np.sum()), file=file, column="title", example=f"item_id={int(ids[blank_np][0])}")
        keep &= ~blank_np
    good_ids = ids[keep]
    if np.unique(good_ids).size != good_ids.size:
        _raise_duplicates(good_ids, file)
    out = table.filter(pa.array(keep)) if not keep.all() else table
    report.rows_out += out.num_rows
    return out


# --------------------------------------------------------------------------- list tables

# (ids list column, its timestamps column or None) per list table.
LIST_COLUMNS: dict[str, tuple[tuple[str, Optional[str]], ...]] = {
    "sequences": (("item_ids", "timestamps"),),
    "examples": (("history", "history_ts"), ("targets", None)),
}


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets relative to 0, values, value-valid mask, row-null mask)`` of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    start, stop = int(offsets[0]), int(offsets[-1])
    vals = arr.values.slice(start, stop - start)
    valid = np.asarray(vals.is_valid()) if vals.null_count else np.ones(len(vals), dtype=bool)
    values = _np(pc.fill_null(vals, 0)) if vals.null_count else _np(vals)
    row_null = ~np.asarray(arr.is_valid()) if arr.null_count else np.zeros(len(arr), dtype=bool)
    return offsets - start, values.astype(np.int64, copy=False), valid, row_null


def validate_lists(
    table: pa.Table,
    file: Any,
    report: Report,
    kind: str = "sequences",
    catalogue: Optional[Catalogue] = None,
) -> pa.Table:
    """Row-level checks of a sequences or examples table (already cast); returns it repaired.

    See the module policy: rows with a null/negative ``user_id``, a null list or a
    timestamps length mismatch are dropped; null/negative/unknown elements are removed
    with their timestamps; rows left with an empty list are dropped; rows whose
    timestamps decrease are sorted by timestamp (stable). All counted in ``report``.
    """
    n = table.num_rows
    report.rows_in += n
    keep = np.ones(n, dtype=bool)
    uid, nulls = _int_column(table, "user_id")
    if nulls is not None:
        report.drop("null_user_id", int(nulls.sum()), file=file, column="user_id")
        keep &= ~nulls
    neg = (uid < 0) & keep
    if neg.any():
        report.drop("negative_user_id", int(neg.sum()), file=file, column="user_id", example=int(uid[neg][0]))
        keep &= ~neg

    # Row-level drops first (null lists, length mismatches), over every list column.
    parts: dict[str, tuple] = {}
    for ids_col, ts_col in LIST_COLUMNS[kind]:
        offsets, values, valid, row_null = _list_parts(table.column(ids_col))
        bad = row_null & keep
        report.drop(f"null_{ids_col}", int(bad.sum()), file=file, column=ids_col)
        keep &= ~row_null
        ts_parts = None
        if ts_col is not None and ts_col in table.column_names:
            t_off, t_vals, t_valid, t_null = _list_parts(table.column(ts_col))
            lengths, t_lengths = np.diff(offsets), np.diff(t_off)
            mismatch = ~t_null & (lengths != t_lengths) & keep
            if mismatch.any():
                report.drop(f"{ts_col}_length_mismatch", int(mismatch.sum()), file=file, column=ts_col, example=f"user_id={int(uid[mismatch][0])}")
                keep &= ~mismatch
            ts_parts = (t_off, t_vals, t_valid, t_null)
        parts[ids_col] = (offsets, values, valid, ts_parts)

    # Element-level repairs, then empty rows.
    new_cols: dict[str, tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]] = {}
    for ids_col, ts_col in LIST_COLUMNS[kind]:
        offsets, values, valid, ts_parts = parts[ids_col]
        lengths = np.diff(offsets)
        row_of = np.repeat(np.arange(n), lengths)
        live = keep[row_of]
        elem_keep = live.copy()
        for reason, bad in (("null_id", ~valid), ("negative_id", valid & (values < 0))):
            b = bad & elem_keep
            if b.any():
                report.remove(f"{ids_col}:{reason}", int(b.sum()), file=file, column=ids_col)
                elem_keep &= ~b
        if catalogue is not None:
            b = ~catalogue.contains(values) & elem_keep
            if b.any():
                report.remove(f"{ids_col}:unknown_item", int(b.sum()), file=file, column=ids_col, example=int(values[b][0]))
                elem_keep &= ~b
        t_vals = t_rows = None
        if ts_parts is not None:
            t_off, tv, t_valid, t_null = ts_parts
            has_ts = ~t_null  # rows with a timestamps list (its length matches, checked above)
            # element j of a row with timestamps: the timestamp at the same position
            t_idx = np.zeros(values.size, dtype=np.int64)
            elem_has_ts = has_ts[row_of] & live
            pos = np.arange(values.size) - np.repeat(offsets[:-1], lengths)
            t_idx[elem_has_ts] = (np.repeat(t_off[:-1], lengths) + pos)[elem_has_ts]
            b = elem_has_ts & ~t_valid[t_idx] & elem_keep if tv.size else np.zeros(values.size, bool)
            if b.any():
                report.remove(f"{ts_col}:null", int(b.sum()), file=file, column=ts_col)
                elem_keep &= ~b
            t_vals = np.where(elem_has_ts, tv[t_idx] if tv.size else 0, 0)
            t_rows = has_ts
        new_len = np.bincount(row_of[elem_keep], minlength=n)
        empty = keep & (new_len == 0)
        if empty.any():
            report.drop(f"empty_{ids_col}", int(empty.sum()), file=file, column=ids_col, example=f"user_id={int(uid[empty][0])}")
            keep &= ~empty
        new_cols[ids_col] = (elem_keep, row_of, t_vals, t_rows)

    # Build the output (only kept rows), sorting rows whose timestamps decrease.
    arrays: dict[str, pa.Array] = {"user_id": pa.array(uid[keep], pa.int64())}
    for ids_col, ts_col in LIST_COLUMNS[kind]:
        offsets, values, _valid, _ts = parts[ids_col]
        elem_keep, row_of, t_vals, t_rows = new_cols[ids_col]
        sel = elem_keep & keep[row_of]
        rows, vals = row_of[sel], values[sel]
        counts = np.bincount(rows, minlength=n)[keep]
        out_off = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=out_off[1:])
        if t_vals is not None:
            tv = t_vals[sel]
            dec = (rows[1:] == rows[:-1]) & (tv[1:] < tv[:-1])
            if dec.any():
                bad_rows = np.unique(rows[1:][dec])
                report.repair(f"unsorted_{ts_col}", bad_rows.size)
                order = np.lexsort((tv, rows))  # stable: ties keep their order
                vals, tv = vals[order], tv[order]
            off32 = pa.array(out_off.astype(np.int32))
            ts_mask = pa.array(~t_rows[keep]) if not t_rows[keep].all() else None
            arrays[ts_col] = pa.ListArray.from_arrays(off32, pa.array(tv, pa.int64()), mask=ts_mask)
        arrays[ids_col] = pa.ListArray.from_arrays(pa.array(out_off.astype(np.int32)), pa.array(vals, pa.int64()))
    from cobra_scale.data.schemas import SCHEMAS

    schema = SCHEMAS[kind]
    names = [f.name for f in schema if f.name in arrays]
    out = pa.Table.from_arrays([arrays[c] for c in names], schema=pa.schema([schema.field(c) for c in names]))
    report.rows_out += out.num_rows
    return out


def check_sequences_table(
    table: pa.Table,
    file: Any,
    report: Optional[Report] = None,
    strict: bool = False,
    kind: str = "sequences",
) -> pa.Table:
    """Structural check, casts and row-level repairs of an in-memory sequences (or examples) table.

    The one-call entry for stages that read a whole shard (``cobra data split``). The
    result has every column of the schema in order (an absent optional list column is all
    null), ``item_ids`` cleaned and ``timestamps`` non-decreasing within each row.
    Repairs are counted in ``report`` when given, else logged in one line.

    Raises:
        DataError: structural problems (see the module policy); under ``strict``, any loss.
    """
    from cobra_scale.data.schemas import SCHEMAS

    schema = SCHEMAS[kind]
    actions = check_schema(table.schema, schema, file, required=REQUIRED[kind])
    table = apply_casts(table, actions, file)
    rep = report if report is not None else Report(kind, strict)
    rep.cast(file, actions)
    out = validate_lists(table, file, rep, kind)
    for f in schema:
        if f.name not in out.column_names:
            out = out.append_column(f, pa.nulls(out.num_rows, f.type))
    out = out.select(schema.names).cast(schema)
    if report is None and (rep.dropped or rep.removed or rep.repaired or rep.casts):
        log.info(
            "%s: %s rows in, %d out; dropped %s; removed %s; repaired %s; casts %s",
            file, rep.rows_in, rep.rows_out, rep.dropped, rep.removed, rep.repaired, rep.casts,
        )
    return out


# --------------------------------------------------------------------------- command


def validate_table(
    path: str | os.PathLike,
    table: str,
    items: Optional[str | os.PathLike] = None,
    strict: bool = False,
    workers: int = 0,
    batch_rows: int = 1_000_000,
) -> Report:
    """Validate a table (file or folder) against its format; return the report.

    Events are checked with the sessioniser's own out-of-core pass (every event type is
    kept, nothing is written), so duplicates and out-of-order users are exact.
    """
    from cobra_scale.data.io import list_parquet_files, open_parquet
    from cobra_scale.data.schemas import SCHEMAS

    if table == "events":
        from cobra_scale.data.sessionize import sessionize_events

        return sessionize_events(
            path, None, items=items, event_types=None, strict=strict, workers=workers, batch_rows=batch_rows, min_items=1
        )
    files = list_parquet_files(path)
    report = Report(table, strict)
    catalogue = load_catalogue(items) if items is not None and table != "items" else None
    expected = SCHEMAS[table]
    if table == "items":
        parts = []
        for f in files:
            pf = open_parquet(f)
            actions = check_schema(pf.schema_arrow, expected, f, required=REQUIRED[table])
            cols = [c for c in expected.names if c in pf.schema_arrow.names]
            try:
                t = pf.read(columns=cols)
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"cannot read Parquet file {f}: {_first_line(exc)}") from exc
            t = apply_casts(t, actions, f)
            report.cast(f, actions)
            parts.append(validate_items(t, f, report))
            report.files += 1
        all_ids = np.concatenate([_np(t.column("item_id")) for t in parts]) if parts else np.zeros(0, np.int64)
        if np.unique(all_ids).size != all_ids.size:
            _raise_duplicates(all_ids, path)
        report.extra["items"] = int(all_ids.size)
    else:
        for f in files:
            pf = open_parquet(f)
            actions = check_schema(pf.schema_arrow, expected, f, required=REQUIRED[table])
            report.cast(f, actions)
            cols = [c for c in expected.names if c in pf.schema_arrow.names]
            try:
                for batch in pf.iter_batches(batch_size=65_536, columns=cols):
                    t = apply_casts(batch, actions, f)
                    validate_lists(t, f, report, table, catalogue)
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"cannot read Parquet file {f}: {_first_line(exc)}") from exc
            report.files += 1
    report.check_balance()
    return report


def run(cfg: Any) -> dict:
    """``cobra data validate``: check a table, print (and optionally save) the report."""
    report = validate_table(cfg.path, cfg.table, items=cfg.items, strict=cfg.strict, workers=cfg.workers)
    report.log_summary()
    if cfg.report:
        report.write_json(cfg.report)
    summary = report.to_dict()
    problems = report.dropped_total - report.dropped.get("event_type", 0) + sum(report.removed.values())
    summary["ok"] = problems == 0
    return summary
