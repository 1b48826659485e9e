"""The A/B Serve app end to end (tools/ab_demo.py): two slots on 127.0.0.1, routing, exposures, live reshare, report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import EVENTS_SCHEMA, day_start
from tests.model.fixtures import tiny_dataset

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(root: Path, n_users: int = 120, n_items: int = 40) -> Path:
    """Day 1: each tiny-dataset user walks i -> i+1; day 2: the next two items, the second bought."""
    d1, d2 = day_start("2026-01-01"), day_start("2026-01-02")
    rows1, rows2 = [], []
    for u in range(n_users):
        start = (u * 7) % n_items
        for t in range(6):
            rows1.append((u, (start + t) % n_items + 1, d1 + 3600 + 60 * t, "click", None))
        nxt = [(start + 6) % n_items + 1, (start + 7) % n_items + 1]
        rows2 += [(u, nxt[0], d2 + 3600, "click", None), (u, nxt[1], d2 + 3700, "click", None)]
        if u % 3 == 0:
            rows2.append((u, nxt[1], d2 + 3800, "conversion", 10.0))
    for day, rows in (("2026-01-01", rows1), ("2026-01-02", rows2)):
        table = pa.Table.from_pylist([dict(zip(EVENTS_SCHEMA.names, r)) for r in rows], schema=EVENTS_SCHEMA)
        write_table(table, root / "events" / f"day={day}" / "part-00000.parquet")
    return root / "events"


@pytest.mark.integration
@pytest.mark.slow
def test_ab_demo_serves_two_slots_and_reports(tmp_path):
    from tests.serve.conftest import train_tiny

    data = tiny_dataset(tmp_path / "data")
    run = train_tiny(data, tmp_path / "run", "epochs=1")
    events = _events(tmp_path)
    out = tmp_path / "ab"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, str(ROOT / "tools" / "ab_demo.py"), "--run", str(run), "--events", str(events), "--out", str(out),
           "--experiments", str(ROOT / "configs" / "ab" / "demo.yaml"), "--users", "0", "--concurrency", "4",
           "--bootstrap", "200", "--port", str(_free_port()), "--reshare-control", "0.3"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    demo = json.loads((out / "demo.json").read_text())
    assert demo["requests"] == demo["answered"] == 120 and demo["exposures_complete"]
    assert set(demo["arms"]) == {"cobra", "no_fusion"}
    live = demo["live_reshare"]
    assert live["control_share_before"] == 0.5 and live["control_share_after"] == pytest.approx(0.3) and live["same_ingress_process"]
    report = (out / "report" / "report.md").read_text()
    assert "## beamfusion" in report and (out / "report" / "lift.png").is_file()
