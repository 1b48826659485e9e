"""tools/bench_batching.py runs on a tiny catalogue, and a batch answers each request as it is answered alone."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_batching.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_batching", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_batching_tiny():
    rows = _bench().run(["--items", "500", "--codes", "8", "--d-model", "16", "--history", "5", "--beams", "6",
                         "--batches", "1", "4", "--requests", "8", "--device", "cpu", "--threads", "1"])
    assert [r["batch"] for r in rows] == [1, 4] and all(r["requests"] == 8 for r in rows)
    assert all(r["same_as_single"] for r in rows)
    assert rows[0]["vs_batch_1"] == 1.0 and rows[1]["requests_per_s"] > 0 and rows[1]["call_ms_p50"] > 0


def test_bench_batching_refuses_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().run(["--batches", "0"])
    assert exc.value.code == 2 and "--batches must be >= 1" in capsys.readouterr().err
