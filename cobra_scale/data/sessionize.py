"""``cobra data sessionize``: day-partitioned events -> one time-ordered sequence per user.

Out of core, with memory bounded by ``batch_rows`` and the partition size, never by the
number of users:

1. **Plan.** Every events file's footer is read: :func:`~cobra_scale.data.validate.check_schema`
   (structural errors stop here, before any work) and row counts. The row groups of all
   files, in sorted-path order, are cut into one contiguous run per worker.
2. **Scatter.** Each worker streams its run in record batches of ``batch_rows``,
   validates them (:func:`~cobra_scale.data.validate.clean_events`: null / negative
   ids, items missing from the catalogue), keeps the ``event_types`` asked for, and
   appends each row to hash partition ``splitmix64(user_id) % P`` — one Arrow IPC
   stream per (worker, partition) under ``OUT/_sessionize_tmp/``. Appends keep the
   *arrival order* (sorted file path, then row), so the row index inside a partition is
   the event's arrival rank: no sequence number has to be stored.
3. **Gather.** Each partition (one per task, in parallel) is loaded, sorted by
   ``(user_id, ts, arrival)``, exact duplicates (same ``user_id, item_id, ts,
   event_type``) are dropped keeping the first arrival, users whose arrival order was
   not time order are counted, users with fewer than ``min_items`` events are dropped,
   and the per-user lists are built from numpy offsets (no per-user Python loop).
4. **Merge.** ``P`` is a multiple of ``shards`` and partition ``p`` belongs to shard
   ``p % shards`` (so ``shard = splitmix64(user_id) % shards``). When ``P == shards`` a
   partition is written straight to its shard file; otherwise each shard's sorted
   partition runs are k-way merged by ``user_id`` into the shard file, a bounded
   buffer per run.

Output (``OUT/``):

* ``part-SSSSS.parquet`` — exactly ``shards`` files (default: one per ~2M input events,
  so a shard's size does not grow with the number of users) in
  :data:`~cobra_scale.data.schemas.SEQUENCES_SCHEMA`, one writer each, users with
  ``user_shard(user_id, shards) == SSSSS``, rows sorted by ``user_id`` (row groups of
  65,536 users, so row-group statistics locate a user), ``item_ids``/``timestamps``
  oldest first (ties in ``ts`` keep arrival order);
* ``report.json`` — rows read, rows per drop reason, users / events out,
  ``users_out_of_order``, files, wall seconds, rows/s (see
  :mod:`cobra_scale.data.validate` for the policy);
* ``config.yaml`` — the resolved config.

Stale ``part-*.parquet`` files of an earlier run in ``OUT`` are replaced. The scratch
folder (about 26 bytes per kept event; ``COBRA_SCRATCH_COMPRESSION=lz4`` halves it) is
deleted at the end, also on failure. Memory: about ``40 * batch_rows`` bytes
per worker in the scatter and about ``120`` bytes per event of the largest partition
in the gather: a few hundred MB per worker with the defaults (1M-row batches, ~2M
events per partition). One user is never split, so a single user with more events
than a partition's worth makes its partition that much larger.

Hash: ``splitmix64`` finaliser (Steele et al.) on the two's-complement ``uint64`` of
``user_id``, wrapping arithmetic, in numpy — stable across runs, machines and
processes (unlike Python's ``hash``). :func:`user_shard` gives a user's shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import logging
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from cobra_scale.data.schemas import EVENTS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.data.validate import (
    REQUIRED,
    CastAction,
    Catalogue,
    Report,
    apply_casts,
    check_schema,
    clean_events,
    load_catalogue,
)
from cobra_scale.errors import DataError

log = logging.getLogger(__name__)

EVENTS_PER_PARTITION = 2_000_000  # target of the automatic partition count
# Target of the automatic shard count: shards of bounded size, whatever the number of users.
# A Ray Data read task reads one file: bounded files bound its input and let readers run in
# parallel at any scale (docs/data.md).
EVENTS_PER_SHARD = 2_000_000
ROW_GROUP_USERS = 65_536  # output row group size (users)
RUN_BATCH_USERS = 8_192  # record batch size of the sorted runs (bounds the merge buffers)
TMP_NAME = "_sessionize_tmp"
MAX_PARTITIONS = 4096

# Scratch rows: ids, time and a per-run event-type code (remapped to global codes on read).
PART_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("ts", pa.int64()),
        pa.field("etype", pa.int16()),
    ]
)
# Scratch streams are uncompressed by default (~26 bytes per event); set
# COBRA_SCRATCH_COMPRESSION=lz4 (or zstd) to halve the scratch disk use on slow or small disks.
_IPC_OPTIONS = ipc.IpcWriteOptions(compression=os.environ.get("COBRA_SCRATCH_COMPRESSION") or None)

# ---------------------------------------------------------------------------- hashing

_C0 = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of int64/uint64 ids, as uint64 (wrapping arithmetic)."""
    z = np.asarray(x).astype(np.int64, copy=False).view(np.uint64) + _C0
    z ^= z >> np.uint64(30)
    z *= _C1
    z ^= z >> np.uint64(27)
    z *= _C2
    z ^= z >> np.uint64(31)
    return z


def user_shard(user_ids: np.ndarray | int, shards: int) -> np.ndarray:
    """The output shard (``part-SSSSS.parquet``) that holds each user: ``splitmix64(id) % shards``."""
    return (splitmix64(np.atleast_1d(np.asarray(user_ids, dtype=np.int64))) % np.uint64(shards)).astype(np.int64)


# ---------------------------------------------------------------------------- worker state

_STATE: dict[str, Any] = {}


class _LocalValue:
    """Stand-in for ``mp.Value`` when everything runs in this process."""

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _init_worker(counter: Any, abort: Any, catalogue: Optional[Catalogue], threads: int) -> None:
    _STATE.update(counter=counter, abort=abort, catalogue=catalogue)
    if threads:
        pa.set_cpu_count(threads)


def _progress(n: int) -> None:
    counter = _STATE.get("counter")
    if counter is not None:
        with counter.get_lock():
            counter.value += n


def _aborted() -> bool:
    abort = _STATE.get("abort")
    return bool(abort is not None and abort.value)


# ---------------------------------------------------------------------------- plan


@dataclass
class _Piece:
    """Row groups of one file, read by one scatter task."""

    file: str
    row_groups: list[int]
    rows: int
    actions: list[CastAction]


def _plan(files: Sequence[Path]) -> tuple[list[tuple[str, list[int], list[CastAction]]], int]:
    """Footers of every file -> schema check, row counts, row-group list per file."""
    from cobra_scale.data.io import open_parquet

    per_file: list[tuple[str, list[int], list[CastAction]]] = []
    total = 0
    for f in files:
        pf = open_parquet(f)
        actions = check_schema(pf.schema_arrow, EVENTS_SCHEMA, f, required=REQUIRED["events"])
        md = pf.metadata
        counts = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        per_file.append((str(f), counts, actions))
        total += sum(counts)
        with contextlib.suppress(Exception):
            pf.close()
    return per_file, total


def _split_runs(per_file: list, total: int, n_runs: int) -> list[list[_Piece]]:
    """Cut the (file, row group) sequence into ``n_runs`` contiguous runs of ~equal rows."""
    runs: list[list[_Piece]] = [[] for _ in range(n_runs)]
    target = max(1, math.ceil(total / n_runs))
    seen = 0
    for file, counts, actions in per_file:
        for rg, n in enumerate(counts):
            r = min(n_runs - 1, seen // target) if total else 0
            run = runs[r]
            if run and run[-1].file == file:
                run[-1].row_groups.append(rg)
                run[-1].rows += n
            else:
                run.append(_Piece(file, [rg], n, actions))
            seen += n
    return [r for r in runs if r]


# ---------------------------------------------------------------------------- scatter


def _open_events(file: str):
    try:
        return pq.ParquetFile(file, read_dictionary=["event_type"])
    except (OSError, pa.ArrowException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read Parquet file {file}: {msg}") from exc


def _read_batches(pf: pq.ParquetFile, file: str, **kwargs: Any) -> Iterable[pa.RecordBatch]:
    """``pf.iter_batches(**kwargs)``; read failures (only those) become a one-line DataError."""
    it = pf.iter_batches(**kwargs)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read Parquet file {file}: {msg}") from exc
        yield batch


def _event_codes(et: pa.ChunkedArray, types: list[str], index: dict[str, int]) -> np.ndarray:
    """Per-row int16 codes of event types into ``types`` (extended in place); nulls -> 0."""
    codes = []
    for chunk in et.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.cast(pa.string()).dictionary_encode()
        dictionary = chunk.dictionary.cast(pa.string()).to_pylist()
        lut = np.empty(len(dictionary), dtype=np.int16)
        for j, name in enumerate(dictionary):
            if name not in index:
                if len(types) >= np.iinfo(np.int16).max:
                    raise DataError("column 'event_type' has more than 32767 distinct values")
                index[name] = len(types)
                types.append(name)
            lut[j] = index[name]
        idx = chunk.indices
        idx_np = idx.fill_null(0).to_numpy(zero_copy_only=False) if idx.null_count else idx.to_numpy(zero_copy_only=False)
        codes.append(lut[idx_np] if lut.size else np.zeros(len(chunk), np.int16))
    return np.concatenate(codes) if len(codes) != 1 else codes[0]


def _scatter(task: tuple) -> Optional[dict]:
    """Scatter task: stream a run of row groups into per-partition IPC streams."""
    run_id, pieces, n_parts, tmp_dir, event_types, batch_rows, strict = task
    catalogue: Optional[Catalogue] = _STATE.get("catalogue")
    report = Report("events", strict)
    types: list[str] = []
    type_index: dict[str, int] = {}
    type_counts = np.zeros(0, np.int64)
    part_rows = np.zeros(n_parts, np.int64)
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    sinks: dict[int, Any] = {}
    run_dir = Path(tmp_dir) / "scatter" / f"r{run_id:05d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    allowed = None if event_types is None else set(event_types)
    part_dtype = np.uint16 if n_parts <= 65_535 else np.int64
    cols = list(REQUIRED["events"])
    try:
        for piece in pieces:
            pf = _open_events(piece.file)
            actions = [a for a in piece.actions if a.column != "event_type"]
            report.cast(piece.file, piece.actions)
            report.files += 1
            for batch in _read_batches(pf, piece.file, batch_size=batch_rows, row_groups=piece.row_groups, columns=cols):
                if _aborted():
                    return None
                table = apply_casts(batch, actions, piece.file)
                keep, c = clean_events(table, piece.file, report, catalogue)
                codes = _event_codes(table.column("event_type"), types, type_index)
                if type_counts.size < len(types):
                    type_counts = np.concatenate([type_counts, np.zeros(len(types) - type_counts.size, np.int64)])
                type_counts += np.bincount(codes[keep], minlength=len(types))[: len(types)]
                if allowed is not None:
                    ok_type = np.array([t in allowed for t in types], dtype=bool)
                    good = ok_type[codes] if len(types) else np.zeros(len(codes), bool)
                    report.drop("event_type", int((keep & ~good).sum()))
                    keep &= good
                if not keep.all():
                    idx = np.flatnonzero(keep)
                    u, i, t, e = c["user_id"][idx], c["item_id"][idx], c["ts"][idx], codes[idx]
                else:
                    u, i, t, e = c["user_id"], c["item_id"], c["ts"], codes
                if u.size:
                    part = (splitmix64(u) % np.uint64(n_parts)).astype(part_dtype)
                    order = np.argsort(part, kind="stable")
                    counts = np.bincount(part, minlength=n_parts)
                    part_rows += counts
                    bounds = np.concatenate([[0], np.cumsum(counts)])
                    u, i, t, e = u[order], i[order], t[order], e[order]
                    for p in np.flatnonzero(counts):
                        a, b = bounds[p], bounds[p + 1]
                        w = writers.get(p)
                        if w is None:
                            sinks[p] = pa.OSFile(str(run_dir / f"p{p:05d}.arrow"), "wb")
                            w = writers[p] = ipc.new_stream(sinks[p], PART_SCHEMA, options=_IPC_OPTIONS)
                        w.write_batch(
                            pa.RecordBatch.from_arrays(
                                [pa.array(u[a:b]), pa.array(i[a:b]), pa.array(t[a:b]), pa.array(e[a:b])],
                                schema=PART_SCHEMA,
                            )
                        )
                _progress(batch.num_rows)
    finally:
        for w in writers.values():
            w.close()
        for s in sinks.values():
            s.close()
    return {"report": report.state(), "types": types, "type_counts": type_counts.tolist(), "part_rows": part_rows}


# ---------------------------------------------------------------------------- gather


def _read_partition(paths: Sequence[str], remaps: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Concatenate a partition's scatter streams in run order (= arrival order)."""
    us, its, tss, es = [], [], [], []
    for path, remap in zip(paths, remaps):
        with pa.OSFile(path, "rb") as src:
            table = ipc.open_stream(src).read_all()
        if table.num_rows == 0:
            continue
        table = table.combine_chunks()
        us.append(table.column(0).chunk(0).to_numpy())
        its.append(table.column(1).chunk(0).to_numpy())
        tss.append(table.column(2).chunk(0).to_numpy())
        es.append(remap[table.column(3).chunk(0).to_numpy()])
        del table
    if not us:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros(0, np.int16)
    cat = np.concatenate if len(us) > 1 else (lambda x: x[0])
    return cat(us), cat(its), cat(tss), cat(es)


def _bits(x: int) -> int:
    return max(1, int(x).bit_length())


def _sort_order(u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Stable order by (user_id, ts): ties keep their arrival (= row) order.

    Fast path: when ``user - min``, ``ts - min`` and the row index fit in 64 bits
    together (e.g. 8M-user id range, 12 days, 2M rows), one packed-key ``np.sort``
    (about twice as fast as an arg-sort); else a stable two-key ``np.lexsort``.
    """
    n = u.size
    if n == 0:
        return np.zeros(0, np.int64)
    u_min, t_min = int(u.min()), int(t.min())
    ub, tb, nb = _bits(int(u.max()) - u_min), _bits(int(t.max()) - t_min), _bits(n - 1)
    if ub + tb + nb <= 64:
        key = (u - u_min).astype(np.uint64) << np.uint64(tb + nb)
        key |= (t - t_min).astype(np.uint64) << np.uint64(nb)
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        key &= np.uint64((1 << nb) - 1)
        return key.view(np.int64)
    return np.lexsort((t, u))


def _sequences(u: np.ndarray, items: np.ndarray, t: np.ndarray, e: np.ndarray, min_items: int, strict: bool) -> tuple[pa.Table, dict]:
    """Sort, de-duplicate, count out-of-order users, drop short users, build the lists."""
    n = u.size
    stats = {"rows": n, "duplicate": 0, "users_out_of_order": 0, "min_items": 0, "users_dropped_min_items": 0}
    order = _sort_order(u, t)
    us, ts = u[order], t[order]
    same_user = us[1:] == us[:-1]
    # Out of order: within a user, a later position holds an earlier arrival.
    late = same_user & (order[1:] < order[:-1])
    if late.any():
        lu = us[1:][late]
        stats["users_out_of_order"] = int(1 + np.count_nonzero(lu[1:] != lu[:-1]))
    items_s, e_s = items[order], e[order]
    keep = None
    # Duplicates can only sit inside runs of equal (user, ts).
    tie = same_user & (ts[1:] == ts[:-1])
    if tie.any():
        in_run = np.zeros(n, dtype=bool)
        in_run[1:] |= tie
        in_run[:-1] |= tie
        pos = np.flatnonzero(in_run)
        sub = np.lexsort((order[pos], e_s[pos], items_s[pos], ts[pos], us[pos]))
        p = pos[sub]
        dup = (us[p[1:]] == us[p[:-1]]) & (ts[p[1:]] == ts[p[:-1]]) & (items_s[p[1:]] == items_s[p[:-1]]) & (e_s[p[1:]] == e_s[p[:-1]])
        if dup.any():
            stats["duplicate"] = int(dup.sum())
            if strict:
                j = p[1:][dup][0]
                raise DataError(
                    f"{stats['duplicate']} exact duplicate event(s) (same user_id, item_id, ts, event_type; e.g. "
                    f"user_id={int(us[j])} item_id={int(items_s[j])} ts={int(ts[j])}); strict mode "
                    "(without --strict they are dropped and counted)"
                )
            keep = np.ones(n, dtype=bool)
            keep[p[1:][dup]] = False
    if keep is not None:
        us, ts, items_s = us[keep], ts[keep], items_s[keep]
    del order, e_s
    m = us.size
    if m:
        starts = np.flatnonzero(np.concatenate(([True], us[1:] != us[:-1])))
        counts = np.diff(np.append(starts, m))
    else:
        starts = counts = np.zeros(0, np.int64)
    short = counts < min_items
    if short.any():
        stats["min_items"] = int(counts[short].sum())
        stats["users_dropped_min_items"] = int(short.sum())
        row_keep = np.repeat(~short, counts)
        us, ts, items_s = us[row_keep], ts[row_keep], items_s[row_keep]
        starts, counts = None, counts[~short]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if counts.size else counts
    if us.size >= np.iinfo(np.int32).max:
        raise DataError("a sessionize partition holds more than 2^31 events; set a larger partitions=")
    offsets = np.zeros(counts.size + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    off = pa.array(offsets)
    table = pa.Table.from_arrays(
        [
            pa.array(us[starts] if counts.size else np.zeros(0, np.int64), pa.int64()),
            pa.ListArray.from_arrays(off, pa.array(items_s, pa.int64())),
            pa.ListArray.from_arrays(off, pa.array(ts, pa.int64())),
        ],
        schema=SEQUENCES_SCHEMA,
    )
    stats["users_out"] = int(counts.size)
    stats["rows_out"] = int(us.size)
    return table, stats


def _write_parquet(tables: Iterable[pa.Table], dest: Path) -> None:
    """Write tables to ``dest`` atomically, in row groups of ``ROW_GROUP_USERS`` users."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    # No dictionary pages (ids and times are high-cardinality: slower and larger); delta
    # encoding for the sorted user ids and the non-decreasing timestamps.
    with pq.ParquetWriter(
        tmp,
        SEQUENCES_SCHEMA,
        compression="zstd",
        use_dictionary=False,
        column_encoding={"user_id": "DELTA_BINARY_PACKED", "timestamps": "DELTA_BINARY_PACKED"},
    ) as writer:
        wrote = False
        for table in tables:
            if table.num_rows:
                writer.write_table(table, row_group_size=ROW_GROUP_USERS)
                wrote = True
        if not wrote:
            writer.write_table(SEQUENCES_SCHEMA.empty_table())
    os.replace(tmp, dest)


def _gather(task: tuple) -> Optional[dict]:
    """Gather task: one partition -> its shard file, or a sorted run for the merge."""
    p, paths, remaps, min_items, dest, kind, strict = task
    if _aborted():
        return None
    u, items, t, e = _read_partition(paths, remaps)
    table, stats = _sequences(u, items, t, e, min_items, strict)
    del u, items, t, e
    if kind == "final":
        _write_parquet([table], Path(dest))
    elif kind == "run" and table.num_rows:
        with pa.OSFile(str(dest), "wb") as sink, ipc.new_stream(sink, SEQUENCES_SCHEMA, options=_IPC_OPTIONS) as w:
            for batch in table.to_batches(max_chunksize=RUN_BATCH_USERS):
                w.write_batch(batch)
    _progress(stats["rows"])
    return stats


# ---------------------------------------------------------------------------- merge


def _merged(runs: Sequence[str]) -> Iterable[pa.Table]:
    """K-way merge of runs sorted by (distinct) user_id; yields tables of ~ROW_GROUP_USERS users."""
    readers = []
    for path in runs:
        src = pa.OSFile(path, "rb")
        readers.append((src, ipc.open_stream(src)))
    heads: list[Optional[pa.Table]] = []

    def next_batch(k: int) -> Optional[pa.Table]:
        reader = readers[k][1]
        while True:
            try:
                b = reader.read_next_batch()
            except StopIteration:
                return None
            if b.num_rows:
                return pa.Table.from_batches([b])

    try:
        heads = [next_batch(k) for k in range(len(readers))]
        pending: list[pa.Table] = []
        pending_rows = 0
        while True:
            live = [k for k, h in enumerate(heads) if h is not None]
            if not live:
                break
            lasts = {k: heads[k].column(0)[-1].as_py() for k in live}
            bound = min(lasts.values())
            parts = []
            for k in live:
                h = heads[k]
                ids = h.column(0).to_numpy()
                cut = int(np.searchsorted(ids, bound, side="right"))
                if cut:
                    parts.append(h.slice(0, cut))
                heads[k] = h.slice(cut) if cut < h.num_rows else next_batch(k)
            merged = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            if len(parts) > 1:
                merged = merged.take(pa.array(np.argsort(merged.column(0).to_numpy(), kind="stable")))
            pending.append(merged)
            pending_rows += merged.num_rows
            if pending_rows >= ROW_GROUP_USERS:
                yield pa.concat_tables(pending).combine_chunks()
                pending, pending_rows = [], 0
        if pending:
            yield pa.concat_tables(pending).combine_chunks()
    finally:
        for src, _ in readers:
            src.close()


def _merge(task: tuple) -> Optional[dict]:
    shard, runs, dest = task
    if _aborted():
        return None
    _write_parquet(_merged(runs), Path(dest))
    _progress(1)
    return {"shard": shard}


# ---------------------------------------------------------------------------- driver


class _Runner:
    """Runs tasks in a spawn-context process pool (or inline), with a tqdm bar fed by a shared counter."""

    def __init__(self, workers: int, catalogue: Optional[Catalogue]) -> None:
        self.workers = workers
        if workers > 1:
            ctx = mp.get_context("spawn")
            self.counter = ctx.Value("q", 0)
            self.abort = ctx.Value("b", 0)
            threads = max(1, (os.cpu_count() or 1) // workers)
            self.pool: Optional[cf.ProcessPoolExecutor] = cf.ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(self.counter, self.abort, catalogue, threads)
            )
        else:
            self.counter, self.abort = _LocalValue(), _LocalValue()
            self.pool = None
            _init_worker(self.counter, self.abort, catalogue, 0)

    def map(self, fn: Callable, tasks: Sequence[tuple], desc: str, total: int, unit: str) -> list:
        from tqdm import tqdm

        self.counter.value = 0
        results: list = [None] * len(tasks)
        with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None, leave=False) as bar:
            if self.pool is None:
                for j, task in enumerate(tasks):
                    results[j] = fn(task)
                    bar.update(self.counter.value - bar.n)
                return results
            futures = {self.pool.submit(fn, task): j for j, task in enumerate(tasks)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                    for f in done:
                        results[futures[f]] = f.result()  # re-raises a worker's DataError
                    bar.update(self.counter.value - bar.n)
            except BaseException:
                self.abort.value = 1
                for f in pending:
                    f.cancel()
                raise
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        _STATE.clear()


def _auto_shards(total_rows: int) -> int:
    return min(MAX_PARTITIONS, max(1, math.ceil(total_rows / EVENTS_PER_SHARD)))


def _auto_partitions(total_rows: int, shards: int) -> int:
    want = max(1, math.ceil(total_rows / EVENTS_PER_PARTITION))
    return shards * math.ceil(want / shards)


def _raise_fd_limit(needed: int) -> None:
    with contextlib.suppress(Exception):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def sessionize_events(
    events: str | os.PathLike,
    out: Optional[str | os.PathLike],
    *,
    items: Optional[str | os.PathLike] = None,
    event_types: Optional[Sequence[str]] = ("click",),
    shards: int = 0,
    partitions: int = 0,
    workers: int = 0,
    strict: bool = False,
    min_items: int = 1,
    batch_rows: int = 1_000_000,
) -> Report:
    """Events (file or folder of Parquet) -> sequences shards in ``out``; returns the report.

    ``out=None`` is a dry run (used by ``cobra data validate``): everything is checked
    and counted, nothing is written (scratch goes to the system temp folder).
    ``event_types=None`` keeps every type. See the module docstring for the layout.
    Workers are ``spawn``-ed processes: a script calling this with ``workers > 1`` must
    do so under ``if __name__ == "__main__":``.

    Raises:
        DataError: structural problems; under ``strict``, any row-level loss.
    """
    from cobra_scale.data.io import list_parquet_files, shard_name

    start = time.perf_counter()
    files = list_parquet_files(events)
    report = Report("events", strict)
    if out is not None:
        out_dir = Path(out)
        ev = Path(events).resolve()
        if ev.is_dir() and (out_dir.resolve() == ev or ev in out_dir.resolve().parents):
            raise DataError(f"--out {out_dir} must not be inside the events folder {ev}")
    per_file, total = _plan(files)
    shards = shards or _auto_shards(total)
    n_parts = partitions or _auto_partitions(total, shards)
    if n_parts % shards:
        n_parts = shards * math.ceil(n_parts / shards)
        log.info("partitions rounded up to %d (a multiple of shards=%d)", n_parts, shards)
    if n_parts > MAX_PARTITIONS:
        raise DataError(f"partitions={n_parts} is more than {MAX_PARTITIONS}; raise shards or lower partitions")
    n_workers = workers or (os.cpu_count() or 1)
    if not workers and total < 1_000_000:
        n_workers = 1  # process start-up would cost more than the work
    runs = _split_runs(per_file, total, max(1, min(n_workers, sum(len(c) for _, c, _ in per_file))))
    _raise_fd_limit(n_parts + 64)

    catalogue = None
    cat_report = None
    if items is not None:
        cat_report = Report("items", strict)
        catalogue = load_catalogue(items, cat_report)
        report.extra["catalogue"] = {"path": str(items), "items": len(catalogue), "dropped": dict(cat_report.dropped)}

    if out is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / TMP_NAME
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="cobra-validate-"))
    runner = _Runner(min(n_workers, max(len(runs), n_parts)), catalogue)
    timings: dict[str, float] = {}
    try:
        # ---- scatter
        t0 = time.perf_counter()
        tasks = [(r, pieces, n_parts, str(tmp), list(event_types) if event_types is not None else None, batch_rows, strict) for r, pieces in enumerate(runs)]
        scattered = runner.map(_scatter, tasks, "sessionize: scatter", total, "row")
        all_types: list[str] = []
        type_counts: dict[str, int] = {}
        part_rows = np.zeros(n_parts, np.int64)
        for res in scattered:
            report.merge(res["report"])
            part_rows += res["part_rows"]
            for name, count in zip(res["types"], res["type_counts"]):
                if name not in type_counts:
                    all_types.append(name)
                type_counts[name] = type_counts.get(name, 0) + int(count)
        code = {name: j for j, name in enumerate(sorted(all_types))}
        remaps = [np.array([code[name] for name in res["types"]] or [0], dtype=np.int16) for res in scattered]
        timings["scatter_s"] = round(time.perf_counter() - t0, 3)

        # ---- gather
        t0 = time.perf_counter()
        k_runs = n_parts // shards
        gtasks = []
        for p in sorted(range(n_parts), key=lambda p: -part_rows[p]):
            paths, maps = [], []
            for r in range(len(runs)):
                f = tmp / "scatter" / f"r{r:05d}" / f"p{p:05d}.arrow"
                if f.exists():
                    paths.append(str(f))
                    maps.append(remaps[r])
            if out is None:
                dest, kind = None, "none"
            elif k_runs == 1:
                dest, kind = str(out_dir / shard_name(p)), "final"
            else:
                (tmp / "runs").mkdir(exist_ok=True)
                dest, kind = str(tmp / "runs" / f"p{p:05d}.arrow"), "run"
            gtasks.append((p, paths, maps, min_items, dest, kind, strict))
        if out is not None:
            for stale in out_dir.glob("part-*.parquet"):
                stale.unlink()
        gathered = runner.map(_gather, gtasks, "sessionize: gather", int(part_rows.sum()), "row")
        timings["gather_s"] = round(time.perf_counter() - t0, 3)
        stats = {k: sum(g[k] for g in gathered) for k in ("duplicate", "users_out_of_order", "min_items", "users_dropped_min_items", "users_out", "rows_out")}
        report.drop("duplicate", stats["duplicate"])
        report.drop("min_items", stats["min_items"])
        report.repair("users_out_of_order", stats["users_out_of_order"])
        report.rows_out = stats["rows_out"]
        report.files = len(files)

        # ---- merge
        if out is not None and k_runs > 1:
            t0 = time.perf_counter()
            mtasks = []
            for s in range(shards):
                rs = [str(tmp / "runs" / f"p{p:05d}.arrow") for p in range(s, n_parts, shards)]
                mtasks.append((s, [r for r in rs if os.path.exists(r)], str(out_dir / shard_name(s))))
            runner.map(_merge, mtasks, "sessionize: merge", shards, "shard")
            timings["merge_s"] = round(time.perf_counter() - t0, 3)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left for the sessionize scratch/output under {tmp if out is None else out_dir}: {exc.strerror}") from exc
        raise
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)

    wall = time.perf_counter() - start
    report.check_balance()
    report.extra.update(
        {
            "events": str(events),
            "out": str(out) if out is not None else None,
            "event_types": list(event_types) if event_types is not None else None,
            "event_type_counts": dict(sorted(type_counts.items())),
            "users_out": stats["users_out"],
            "users_out_of_order": stats["users_out_of_order"],
            "users_dropped_min_items": stats["users_dropped_min_items"],
            "min_items": min_items,
            "shards": shards if out is not None else 0,
            "partitions": n_parts,
            "workers": runner.workers,
            "wall_s": round(wall, 3),
            "rows_per_s": round(report.rows_in / wall) if wall > 0 else 0,
            **timings,
        }
    )
    if stats["users_out"] == 0 and out is not None:
        log.warning(
            "sessionize: no user left (rows in: %d, dropped: %s; event types present: %s)",
            report.rows_in, report.dropped, sorted(type_counts),
        )
    return report


def run(cfg: Any) -> dict:
    """``cobra data sessionize``: see the module docstring. Returns the summary the CLI prints."""
    from cobra_scale.config import save_config

    report = sessionize_events(
        cfg.events,
        cfg.out,
        items=cfg.items,
        event_types=list(cfg.event_types),
        shards=cfg.shards,
        partitions=cfg.partitions,
        workers=cfg.workers,
        strict=cfg.strict,
        min_items=cfg.min_items,
        batch_rows=cfg.batch_rows,
    )
    report.log_summary(log)
    save_config(cfg, cfg.out)
    report.write_json(Path(cfg.out) / "report.json")
    d = report.to_dict()
    keys = ("rows_in", "rows_out", "rows_filtered", "rows_dropped", "dropped", "users_out", "users_out_of_order", "users_dropped_min_items", "files", "shards", "partitions", "workers", "wall_s", "rows_per_s", "out")
    return {k: d[k] for k in keys if k in d}
