"""Exposure log: who saw what, appended to Parquet shards from a background thread.

``ExposureLogger.log`` only appends a tuple to an in-memory buffer under a lock (about a
microsecond); a writer thread turns the buffer into a Parquet shard every
``flush_interval_s`` seconds or ``flush_rows`` rows, whichever comes first. Callers never
wait for disk, except under overload: past ``max_pending_rows`` unwritten rows, ``log``
waits for the writer instead of dropping records (backpressure, counted in ``stats``).

Nothing is lost on a clean shutdown: :meth:`close` (also called by ``with``, by an
``atexit`` hook, and by the Serve ingress's shutdown) writes every buffered row before
returning. A failed write keeps its rows in the buffer and is retried.

Shards: ``OUT/part-<host>-<pid>-<nonce>-<seq>.parquet`` (zstd), written under a hidden temp
name and renamed, so readers never see a partial file and any number of processes can
share one folder. Schema :data:`EXPOSURES_SCHEMA`, one row per (request, experiment).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cobra_scale.data.io import write_table

log = logging.getLogger(__name__)

EXPOSURES_SCHEMA = pa.schema(
    [
        pa.field("ts_ms", pa.int64(), nullable=False),  # Unix milliseconds, UTC
        pa.field("user_id", pa.string(), nullable=True),  # canonical id; null when absent
        pa.field("experiment", pa.string(), nullable=True),  # null: the user is in no experiment
        pa.field("arm", pa.string(), nullable=False),  # arm, or "default" / "holdout"
        pa.field("model", pa.string(), nullable=True),  # model version that served the request
        pa.field("items", pa.list_(pa.int64()), nullable=False),  # recommended item ids, best first
        pa.field("scores", pa.list_(pa.float32()), nullable=False),  # their scores
    ],
    metadata={"cobra_scale.table": "ab_exposures"},
)

_OPEN: "weakref.WeakSet[ExposureLogger]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # clean interpreter exit: flush every logger still open
    for logger in list(_OPEN):
        try:
            logger.close()
        except Exception as exc:  # never mask the program's own exit status
            log.error("exposure log %s: final flush failed: %s", logger.out_dir, exc)


_WARM = False


def _warm_up_writer() -> None:
    """Write one empty table to memory so that pyarrow's lazy imports happen now.

    Otherwise the first write may happen in the atexit flush, where importing a module that
    registers its own exit hook (pandas -> concurrent.futures) fails and the rows are lost.
    """
    global _WARM
    if not _WARM:
        pq.write_table(EXPOSURES_SCHEMA.empty_table(), pa.BufferOutputStream())
        _WARM = True


def _as_list(values: Any) -> list:
    if values is None:
        return []
    if hasattr(values, "tolist"):  # numpy arrays, torch tensors
        return values.tolist()
    return list(values)


class ExposureLogger:
    """Thread-safe, buffered exposure log writer.

    Args:
        out_dir: folder of the Parquet shards (created).
        flush_rows: write a shard once this many rows are buffered.
        flush_interval_s: ...or once the oldest buffered row is this old.
        max_pending_rows: bound on buffered rows; beyond it ``log`` waits for the writer.

    Example::

        with ExposureLogger("runs/ab/exposures") as exposures:
            route = router.route(user_id)
            exposures.log_route(route, items, scores)
    """

    def __init__(self, out_dir: str | os.PathLike, flush_rows: int = 10_000, flush_interval_s: float = 2.0, max_pending_rows: int = 1_000_000):
        if flush_rows <= 0 or flush_interval_s <= 0 or max_pending_rows < flush_rows:
            raise ValueError("need flush_rows > 0, flush_interval_s > 0 and max_pending_rows >= flush_rows")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.max_pending_rows = max_pending_rows
        self._prefix = f"part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _warm_up_writer()
        self._cond = threading.Condition(threading.Lock())  # never re-entered: a plain lock is cheaper
        self._buffer: list[tuple] = []
        self._writing = 0  # rows taken by the writer and not yet on disk
        self._seq = 0
        self._logged = 0
        self._written = 0
        self._flush_wanted = False
        self._closed = False
        self._waits = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"exposure-log-{self._prefix}", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # -- producer side -------------------------------------------------------------------------

    def log(self, user_id: str | None, experiment: str | None, arm: str, items: Sequence[int], scores: Sequence[float], model: str | None = None, ts: float | None = None) -> None:
        """Append one exposure (``ts``: Unix seconds, default now)."""
        row = (int((time.time() if ts is None else ts) * 1000), user_id, experiment, arm, model, _as_list(items), _as_list(scores))
        with self._cond:
            if self._closed:
                raise RuntimeError(f"exposure log {self.out_dir} is closed")
            while len(self._buffer) >= self.max_pending_rows:  # overload: wait rather than drop
                if not self._thread.is_alive():
                    raise RuntimeError(f"exposure log writer {self.out_dir} has stopped") from self._error
                self._waits += 1
                self._flush_wanted = True
                self._cond.notify_all()
                self._cond.wait(0.1)
            self._buffer.append(row)
            self._logged += 1
            if len(self._buffer) >= self.flush_rows:
                self._cond.notify_all()

    def log_route(self, route: Any, items: Sequence[int], scores: Sequence[float], ts: float | None = None) -> None:
        """Log a :class:`~cobra_scale.ab.router.Route`: one row per experiment the user is in."""
        items, scores = _as_list(items), _as_list(scores)
        for experiment, arm in route.exposures():
            self.log(route.user_id, experiment, arm, items, scores, model=route.model, ts=ts)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every row logged before this call is on disk; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            goal = self._logged
            self._flush_wanted = True
            self._cond.notify_all()
            while self._written < goal:
                if not self._thread.is_alive():
                    raise RuntimeError(f"exposure log writer {self.out_dir} has stopped") from self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    def close(self) -> None:
        """Write every buffered row, stop the writer thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        _OPEN.discard(self)
        if self._buffer:
            raise RuntimeError(f"exposure log {self.out_dir}: {len(self._buffer)} rows could not be written: {self._error}")

    def __enter__(self) -> "ExposureLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        with self._cond:
            return {"logged": self._logged, "written": self._written, "pending": len(self._buffer) + self._writing, "shards": self._seq, "backpressure_waits": self._waits}

    # -- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_interval_s
                while not (self._closed or self._flush_wanted or len(self._buffer) >= self.flush_rows):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                rows, self._buffer = self._buffer, []
                self._writing = len(rows)
                self._flush_wanted = False
                closing = self._closed
            if rows:
                try:
                    self._write(rows)
                    backoff = self.flush_interval_s
                except Exception as exc:  # keep the rows; retry later (or report on close)
                    log.error("exposure log %s: writing %d rows failed: %s", self.out_dir, len(rows), exc)
                    with self._cond:
                        self._error = exc
                        self._buffer = rows + self._buffer
                        self._writing = 0
                    if closing:
                        return
                    time.sleep(min(backoff, 30.0))
                    backoff *= 2
                    continue
            with self._cond:
                self._written += len(rows)
                self._writing = 0
                self._cond.notify_all()
                if closing and not self._buffer:
                    return

    def _write(self, rows: list[tuple]) -> None:
        cols = list(zip(*rows))
        table = pa.Table.from_arrays([pa.array(list(col), type=f.type) for col, f in zip(cols, EXPOSURES_SCHEMA)], schema=EXPOSURES_SCHEMA)
        write_table(table, self.out_dir / f"{self._prefix}-{self._seq:06d}.parquet")
        self._seq += 1
