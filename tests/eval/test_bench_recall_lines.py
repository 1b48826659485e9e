"""tools/bench_recall.py lines: how well ID folders group product lines, on a hand-made case."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_recall.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_recall", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_lines_stage_reports_the_share_of_each_line_in_its_top_prefix(tmp_path):
    # 8 items, 2 lines of 4 (one topic); line 0 sits in one ID, line 1 is split 3 + 1 at level 2
    (tmp_path / "raw" / "truth").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": list(range(8)), "topic": [0] * 8, "line": [0, 0, 0, 0, 1, 1, 1, 1]}),
                   tmp_path / "raw" / "truth" / "items_truth.parquet")
    (tmp_path / "ids").mkdir()
    order = [7, 6, 5, 4, 3, 2, 1, 0]  # rows in another order than item ids
    code_0 = {i: 0 for i in range(8)}
    code_1 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 2}
    pq.write_table(pa.table({"item_id": order, "code_0": [code_0[i] for i in order], "code_1": [code_1[i] for i in order]}),
                   tmp_path / "ids" / "sids.parquet")
    load_bench().main(["lines", "--root", str(tmp_path)])
    report = json.loads((tmp_path / "lines_report.json").read_text())
    assert report["ids level 1"] == {"line_share": 1.0, "topic_share": 1.0, "distinct": 1}
    assert report["ids level 2"]["line_share"] == pytest.approx((1.0 * 4 + 0.75 * 4) / 8)
    assert report["ids level 2"]["topic_share"] == pytest.approx(0.5) and report["ids level 2"]["distinct"] == 3


def test_lines_stage_refuses_logs_without_lines(tmp_path):
    (tmp_path / "raw" / "truth").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": [0, 1], "topic": [0, 0]}), tmp_path / "raw" / "truth" / "items_truth.parquet")
    with pytest.raises(SystemExit, match="no product lines"):
        load_bench().main(["lines", "--root", str(tmp_path)])


def test_every_run_has_its_eval_settings():
    bench = load_bench()
    assert set(bench.RUNS) == set(bench.EVAL)
    assert "model.item_embedding=true" in bench.RUNS["full_items"]
