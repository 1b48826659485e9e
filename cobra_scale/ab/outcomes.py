"""``cobra ab outcomes``: replay exposures against the next day's logged events.

For each (experiment, user) of the exposure log:

* the user's **arm** is the arm of their first exposure (``arms_seen`` > 1 flags users whose
  arm changed, e.g. after a reshare; the analysis reports them);
* the **window** is ``window_days`` whole UTC days starting the day after that first exposure;
* **shown** items are those recommended to the user in that experiment before the window;
* outcomes count the user's events in the window: ``all_*`` over every item, and the
  attributed ``clicks`` / ``conversions`` / ``revenue`` over shown items only.

Offline, the logged next-day events do not depend on what was recommended, so the ``all_*``
outcomes are an A/A check (no arm can move them) and the attributed outcomes are the
replay's measure of the recommendations: how many of tomorrow's purchases each arm put in
front of the user today. Every exposed user gets a row, zeros included.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cobra_scale.ab.configs import OutcomesConfig
from cobra_scale.ab.exposure import EXPOSURES_SCHEMA
from cobra_scale.config import save_config
from cobra_scale.data.io import hive_partitions, list_parquet_files, read_table, write_table
from cobra_scale.data.schemas import SECONDS_PER_DAY, day_start
from cobra_scale.errors import DataError

log = logging.getLogger(__name__)

OUTCOMES_SCHEMA = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("arm", pa.string(), nullable=False),
        pa.field("first_exposure_ms", pa.int64(), nullable=False),
        pa.field("window_start", pa.int64(), nullable=False),  # Unix seconds, UTC
        pa.field("exposures", pa.int64(), nullable=False),
        pa.field("arms_seen", pa.int64(), nullable=False),
        pa.field("clicks", pa.int64(), nullable=False),  # on shown items
        pa.field("conversions", pa.int64(), nullable=False),
        pa.field("revenue", pa.float64(), nullable=False),
        pa.field("all_clicks", pa.int64(), nullable=False),  # on any item
        pa.field("all_conversions", pa.int64(), nullable=False),
        pa.field("all_revenue", pa.float64(), nullable=False),
    ],
    metadata={"cobra_scale.table": "ab_outcomes"},
)


def read_exposures(path: str | Path) -> pd.DataFrame:
    """Exposure rows of users in an experiment (default-route rows dropped)."""
    wanted = ["ts_ms", "user_id", "experiment", "arm", "items"]
    table = read_table(path)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(f"{path} is not an exposure log ({EXPOSURES_SCHEMA.metadata[b'cobra_scale.table'].decode()}): missing column(s) {', '.join(missing)}")
    df = table.select(wanted).to_pandas()
    return df[df["experiment"].notna() & df["user_id"].notna()].reset_index(drop=True)


def _read_events(path: str | Path, first_day: int, last_day: int, users: pd.Index) -> pd.DataFrame:
    """Events with ``first_day*86400 <= ts < (last_day+1)*86400`` of ``users`` (string ids)."""
    root = Path(path)
    files = list_parquet_files(root)
    wanted = []
    for f in files:
        day = hive_partitions(f, root).get("day") if root.is_dir() else None
        if day is not None:
            try:
                d = (dt.date.fromisoformat(day) - dt.date(1970, 1, 1)).days
            except ValueError:
                raise DataError(f"{f}: partition day={day} is not a date YYYY-MM-DD") from None
            if not first_day <= d <= last_day:
                continue  # partition pruning: only the window's days are read
        wanted.append(f)
    lo, hi = first_day * SECONDS_PER_DAY, (last_day + 1) * SECONDS_PER_DAY
    frames = []
    int_ids = bool(users.str.fullmatch(r"-?\d{1,18}").all())
    int_set = pd.Index(users.astype(np.int64)) if int_ids else None
    for f in wanted:
        try:
            t = pq.read_table(f, columns=["user_id", "item_id", "ts", "event_type", "value"])
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise DataError(f"cannot read events {f}: {str(exc).strip().splitlines()[0]}") from exc
        df = t.to_pandas()
        df = df[(df["ts"] >= lo) & (df["ts"] < hi)]
        if int_ids and pa.types.is_integer(t.schema.field("user_id").type):
            df = df[df["user_id"].isin(int_set)]
        else:  # string ids somewhere: compare canonical strings
            df = df[df["user_id"].astype(str).str.strip().isin(users)]
        frames.append(df)
    if not frames:
        return pd.DataFrame({"user_id": pd.Series(dtype=str), "item_id": pd.Series(dtype=np.int64), "ts": pd.Series(dtype=np.int64), "event_type": pd.Series(dtype=str), "value": pd.Series(dtype=np.float64)})
    events = pd.concat(frames, ignore_index=True)
    events["user_id"] = events["user_id"].astype(str)
    return events


def replay(exposures: pd.DataFrame, events_path: str | Path, window_days: int = 1, exposure_day: str | None = None) -> pd.DataFrame:
    """Per-(experiment, user) outcomes (OUTCOMES_SCHEMA columns) from exposure rows and logged events.

    ``exposure_day`` (``YYYY-MM-DD``) re-dates every exposure to that day, keeping their order:
    an offline replay serves "day D" now, and its outcomes are the logs' day D+1.
    """
    if exposures.empty:
        raise DataError("the exposure log holds no exposure of a user in an experiment")
    exp = exposures.sort_values("ts_ms", kind="stable")
    if exposure_day is not None:  # same order and spacing inside the day, the logs' calendar
        served = exp["ts_ms"] - exp["ts_ms"].min()
        exp = exp.assign(ts_ms=day_start(exposure_day) * 1000 + np.minimum(served, SECONDS_PER_DAY * 1000 - 1))
    users = exp.groupby(["experiment", "user_id"], sort=True).agg(
        arm=("arm", "first"), first_exposure_ms=("ts_ms", "first"), exposures=("arm", "size"), arms_seen=("arm", "nunique")
    ).reset_index()
    first_day = users["first_exposure_ms"] // 1000 // SECONDS_PER_DAY
    users["window_start"] = (first_day + 1) * SECONDS_PER_DAY
    users["window_end"] = users["window_start"] + window_days * SECONDS_PER_DAY

    # items shown to the user in the experiment before the window opened
    shown = exp.merge(users[["experiment", "user_id", "window_start"]], on=["experiment", "user_id"])
    shown = shown[shown["ts_ms"] < shown["window_start"] * 1000][["experiment", "user_id", "items"]].explode("items")
    shown = shown.dropna(subset=["items"]).rename(columns={"items": "item_id"})
    shown["item_id"] = shown["item_id"].astype(np.int64)
    shown = shown[shown["item_id"] >= 0].drop_duplicates()
    shown["shown"] = True

    events = _read_events(events_path, int(first_day.min()) + 1, int(first_day.max()) + window_days, pd.Index(users["user_id"].unique()))
    log.info("replay: %d exposed (experiment, user) pairs, %d events in their windows", len(users), len(events))
    ev = events.merge(users[["experiment", "user_id", "window_start", "window_end"]], on="user_id")
    ev = ev[(ev["ts"] >= ev["window_start"]) & (ev["ts"] < ev["window_end"])]
    ev = ev.merge(shown, on=["experiment", "user_id", "item_id"], how="left")
    ev["shown"] = ev["shown"].fillna(False).astype(bool)
    ev["is_click"] = ev["event_type"] == "click"
    ev["is_conv"] = ev["event_type"] == "conversion"
    ev["revenue"] = np.where(ev["is_conv"], ev["value"].fillna(0.0).astype(np.float64), 0.0)
    agg = ev.assign(
        clicks=ev["is_click"] & ev["shown"], conversions=ev["is_conv"] & ev["shown"], rev_shown=np.where(ev["shown"], ev["revenue"], 0.0)
    ).groupby(["experiment", "user_id"]).agg(
        clicks=("clicks", "sum"), conversions=("conversions", "sum"), revenue=("rev_shown", "sum"),
        all_clicks=("is_click", "sum"), all_conversions=("is_conv", "sum"), all_revenue=("revenue", "sum"),
    ).reset_index()  # fmt: skip
    out = users.merge(agg, on=["experiment", "user_id"], how="left")
    for col in ("clicks", "conversions", "all_clicks", "all_conversions"):
        out[col] = out[col].fillna(0).astype(np.int64)
    for col in ("revenue", "all_revenue"):
        out[col] = out[col].fillna(0.0).astype(np.float64)
    return out[[f.name for f in OUTCOMES_SCHEMA]]


def run(cfg: OutcomesConfig) -> dict:
    out = Path(cfg.out)
    if out.suffix != ".parquet":
        raise DataError(f"--out must be a .parquet file, got {out}")
    outcomes = replay(read_exposures(cfg.exposures), cfg.events, cfg.window_days, cfg.exposure_day)
    write_table(pa.Table.from_pandas(outcomes, schema=OUTCOMES_SCHEMA, preserve_index=False), out)
    save_config(cfg, out.parent, filename=f"{out.stem}.config.yaml")
    summary: dict = {"users": len(outcomes), "out": str(out)}
    for (e, a), g in outcomes.groupby(["experiment", "arm"]):
        summary[f"{e}/{a} users"] = len(g)
        summary[f"{e}/{a} converted (shown, all)"] = f"{int((g['conversions'] > 0).sum())}, {int((g['all_conversions'] > 0).sum())}"
    return summary
