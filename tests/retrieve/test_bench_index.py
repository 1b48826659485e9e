"""tools/bench_index.py runs end to end on a tiny catalogue and checks itself."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_index.py"


def test_bench_index_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_index", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--items", "3000", "--ids", "60", "--queries", "5", "--beams", "4", "--check", "20", "--repeats", "1",
                      "--shards", "2", "--full-scan", "20", "--exact-k", "30", "--json", "--out", str(tmp_path / "r.json")])
    assert out["checked_beams"] == 20 and out["max_score_diff"] < 1e-5
    assert out["ivf_beams_per_s"] > 0 and out["exact_all_beams_per_s"] > 0 and out["flat_bytes"] > 3000 * 64 * 4
    assert out["full_scan"]["top_k_overlap"] == 1.0 and out["full_scan"]["max_score_diff"] < 1e-5
    assert (tmp_path / "r.json").is_file()
