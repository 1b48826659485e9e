"""tools/bench_contrastive.py runs end to end on a tiny case (one subprocess per case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_contrastive.py"


def test_bench_prints_one_row_per_case():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--batch-sizes", "64", "--dims", "8", "--repeats", "1", "--json", "--no-cuda",
         "--impls", "tiled"],
        capture_output=True, text=True, timeout=900, check=True,  # generous: CI machines can be loaded
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["impl"] for r in rows] == ["tiled"]
    for row in rows:
        assert row["B"] == 64 and row["d"] == 8 and row["peak_mib"] >= 0 and row["time_s"] >= 0, row  # a tiny case can round to 0.0 s
