"""tools/bench_eval.py runs end to end on a tiny synthetic run (local path)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_eval.py"


@pytest.mark.slow
def test_bench_eval_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_eval", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--items", "2000", "--users", "16", "--workers", "0", "--ks", "5,10", "--beams", "4", "--d-model", "32",
                      "--levels", "2", "--codes", "8", "--day-users", "1000", "--project-workers", "1,10", "--json", "--out", str(tmp_path / "r.json")])
    assert out["local_users_per_s"] > 0 and "ray_s" not in out
    seconds = out["projection"]["seconds"]
    assert seconds[1] == pytest.approx(10 * seconds[10], rel=2e-2)
    assert (tmp_path / "r.json").is_file()
