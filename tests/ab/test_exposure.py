"""Exposure log: complete under concurrent writers, non-blocking, nothing lost on clean shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cobra_scale.ab.exposure import EXPOSURES_SCHEMA, ExposureLogger
from cobra_scale.ab.router import ABRouter
from cobra_scale.data.io import read_table
from tests.ab.helpers import two_arm_dict


def test_concurrent_writers_lose_nothing(tmp_path):
    threads, per_thread = 8, 1000
    logger = ExposureLogger(tmp_path / "exp", flush_rows=1000, flush_interval_s=0.05)

    def work(t: int):
        for i in range(per_thread):
            logger.log(f"{t}-{i}", "fusion", "control" if i % 2 else "treatment", [i, i + 1], [0.5, 0.25], model="cobra", ts=1_767_225_600 + i)

    ws = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    logger.close()
    table = read_table(tmp_path / "exp")
    assert table.schema.equals(EXPOSURES_SCHEMA, check_metadata=False)
    users = table.column("user_id").to_pylist()
    assert len(users) == len(set(users)) == threads * per_thread
    assert logger.stats["written"] == threads * per_thread and logger.stats["shards"] >= 2
    row = table.filter(pc.equal(table.column("user_id"), "3-7")).to_pylist()[0]
    assert (row["arm"], row["items"], row["scores"], row["ts_ms"]) == ("control", [7, 8], [0.5, 0.25], (1_767_225_600 + 7) * 1000)
    with pytest.raises(RuntimeError, match="closed"):
        logger.log("x", None, "default", [], [])


def test_log_does_not_wait_for_disk(tmp_path, monkeypatch):
    logger = ExposureLogger(tmp_path / "exp", flush_rows=100, flush_interval_s=0.01)
    started = threading.Event()
    release = threading.Event()
    real_write = logger._write

    def slow_write(rows):  # a disk that hangs until released
        started.set()
        release.wait(10)
        real_write(rows)

    monkeypatch.setattr(logger, "_write", slow_write)
    for i in range(150):
        logger.log(str(i), "e", "a", [1], [1.0])
    assert started.wait(5)
    t0 = time.perf_counter()
    for i in range(150, 5150):
        logger.log(str(i), "e", "a", [1], [1.0])
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed  # 5000 logs while the writer is stuck: callers never blocked
    release.set()
    assert logger.flush(timeout=10)
    logger.close()
    assert read_table(tmp_path / "exp").num_rows == 5150


def test_failed_write_is_retried(tmp_path, monkeypatch):
    logger = ExposureLogger(tmp_path / "exp", flush_rows=10, flush_interval_s=0.01)
    real_write, calls = logger._write, []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise OSError("disk full")
        real_write(rows)

    monkeypatch.setattr(logger, "_write", flaky)
    for i in range(25):
        logger.log(str(i), "e", "a", [i], [1.0])
    assert logger.flush(timeout=10)
    logger.close()
    assert len(calls) >= 2 and read_table(tmp_path / "exp").num_rows == 25


def test_backpressure_instead_of_loss(tmp_path):
    logger = ExposureLogger(tmp_path / "exp", flush_rows=50, flush_interval_s=10.0, max_pending_rows=50)
    for i in range(500):
        logger.log(str(i), "e", "a", [], [])
    logger.close()
    assert read_table(tmp_path / "exp").num_rows == 500


@pytest.mark.integration
def test_clean_exit_flushes_without_close(tmp_path):
    """A process that exits normally (no close call) still writes every row (atexit hook)."""
    code = (
        "import sys\n"
        "from cobra_scale.ab.exposure import ExposureLogger\n"
        "log = ExposureLogger(sys.argv[1], flush_rows=10_000, flush_interval_s=60)\n"
        "for i in range(1234):\n"
        "    log.log(str(i), 'e', 'a', [i], [0.1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp")], check=True, timeout=60)
    assert read_table(tmp_path / "exp").num_rows == 1234
    assert not [p for p in (tmp_path / "exp").iterdir() if p.name.startswith(".")]  # no temp file left


def test_log_route_one_row_per_experiment(tmp_path):
    d = two_arm_dict(end=10_000)
    d["experiments"].append({"name": "tau", "layer": "inference", "start": 0, "end": 10_000, "arms": [{"name": "t1", "share": 0.5}, {"name": "t2", "share": 0.5}]})
    router = ABRouter(d)
    with ExposureLogger(tmp_path / "exp") as logger:
        logger.log_route(router.route(7), [3, 4], [0.9, 0.1], ts=0)
        logger.log_route(router.route(None), [5], [0.5], ts=0)
    rows = pq.read_table(next((tmp_path / "exp").glob("*.parquet"))).to_pylist()
    assert sorted(r["experiment"] or "" for r in rows) == ["", "fusion", "tau"]
    assert all(r["items"] in ([3, 4], [5]) for r in rows)
