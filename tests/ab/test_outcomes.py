"""Outcome replay on hand-made events: window, attribution to shown items, zeros kept."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cobra_scale.ab.exposure import ExposureLogger
from cobra_scale.ab.outcomes import read_exposures, replay
from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import EVENTS_SCHEMA, day_start
from cobra_scale.errors import DataError

D1, D2, D3 = day_start("2026-01-01"), day_start("2026-01-02"), day_start("2026-01-03")


def _events(root, day, rows):
    table = pa.Table.from_pylist([dict(zip(("user_id", "item_id", "ts", "event_type", "value"), r)) for r in rows], schema=EVENTS_SCHEMA)
    write_table(table, root / f"day={day}" / "part-00000.parquet")


@pytest.fixture
def logs(tmp_path):
    ev = tmp_path / "events"
    _events(ev, "2026-01-01", [(1, 10, D1 + 100, "conversion", 3.0)])  # before the window: ignored
    _events(ev, "2026-01-02", [
        (1, 10, D2 + 10, "click", None), (1, 10, D2 + 20, "conversion", 5.0),  # shown item: attributed
        (1, 77, D2 + 30, "conversion", 2.0),  # not shown: counted in all_* only
        (2, 99, D2 + 40, "conversion", 7.0), (2, 12, D2 + 50, "click", None),
        (4, 10, D2 + 60, "conversion", 1.0),  # user 4 was never exposed
    ])  # fmt: skip
    _events(ev, "2026-01-03", [(1, 10, D3 + 5, "conversion", 100.0)])  # after the window
    with ExposureLogger(tmp_path / "exposures") as log:
        t = D1 + 12 * 3600
        log.log("1", "fusion", "control", [10, 11], [0.9, 0.1], ts=t)
        log.log("2", "fusion", "treatment", [12], [1.0], ts=t)
        log.log("3", "fusion", "treatment", [10], [1.0], ts=t)
        log.log("1", "fusion", "treatment", [77], [1.0], ts=D2 + 1)  # re-exposed in another arm, inside the window
        log.log(None, None, "default", [10], [1.0], ts=t)  # absent id: not in the experiment
    return tmp_path


def test_replay_next_day(logs):
    out = replay(read_exposures(logs / "exposures"), logs / "events", window_days=1).set_index("user_id")
    assert sorted(out.index) == ["1", "2", "3"]
    u1, u2, u3 = out.loc["1"], out.loc["2"], out.loc["3"]
    assert (u1.arm, u1.exposures, u1.arms_seen, u1.window_start) == ("control", 2, 2, D2)
    # item 77 was shown only after the window opened: not attributed
    assert (u1.clicks, u1.conversions, u1.revenue) == (1, 1, 5.0)
    assert (u1.all_clicks, u1.all_conversions, u1.all_revenue) == (1, 2, 7.0)
    assert (u2.clicks, u2.conversions, u2.revenue, u2.all_clicks, u2.all_conversions, u2.all_revenue) == (1, 0, 0.0, 1, 1, 7.0)
    assert (u3.clicks, u3.conversions, u3.all_conversions, u3.revenue) == (0, 0, 0, 0.0)


def test_replay_longer_window(logs):
    out = replay(read_exposures(logs / "exposures"), logs / "events", window_days=2).set_index("user_id")
    assert out.loc["1"].conversions == 2 and out.loc["1"].revenue == 105.0


def test_empty_exposures_is_a_data_error(tmp_path):
    with ExposureLogger(tmp_path / "exposures") as log:
        log.log(None, None, "default", [1], [1.0])
    with pytest.raises(DataError, match="no exposure"):
        replay(read_exposures(tmp_path / "exposures"), tmp_path, 1)


def test_exposure_day_redates_live_exposures(logs, tmp_path):
    """An offline replay serves 'day D' now: exposures logged today count as made on D."""
    with ExposureLogger(tmp_path / "live") as log:  # served now, stamped with today's clock
        log.log("1", "fusion", "control", [10, 11], [0.9, 0.1])
        log.log("2", "fusion", "treatment", [12], [1.0])
    out = replay(read_exposures(tmp_path / "live"), logs / "events", 1, exposure_day="2026-01-01").set_index("user_id")
    assert list(out["window_start"]) == [D2, D2]
    assert (out.loc["1"].conversions, out.loc["1"].revenue, out.loc["2"].clicks) == (1, 5.0, 1)
