"""Config schemas of the ``cobra data ...`` commands (dataclasses only: cheap to import)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _date(name: str, value: Optional[str]) -> None:
    if value is None:
        return
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{name} must be a date YYYY-MM-DD, got '{value}'") from None


@dataclass
class SynthConfig:
    """``cobra data synth``: realistic, learnable synthetic logs (events + items)."""

    out: str = field(help="output folder (events/ and items.parquet are written there)")
    users: int = field(10_000, help="number of users")
    items: int = field(2_000, help="number of items in the catalogue")
    days: int = field(7, help="number of days of events")
    shards: int = field(0, help="user shards (independent, generated in parallel); 0 = one per 100k users")
    workers: int = field(0, help="parallel processes; 0 = number of CPUs")
    seed: int = field(0, help="random seed; output is a pure function of (config, seed)")
    start_date: str = field("2026-01-01", help="first day of the logs (UTC)")
    topics: int = field(0, help="latent topics; 0 = items/60 clamped to [8, 512]")
    mean_events: float = field(12.0, help="mean clicks per user over the whole period")
    popularity_alpha: float = field(1.05, help="Zipf exponent of item popularity inside a topic")
    p_sequential: float = field(0.55, help="probability the next item follows the previous one (successor graph)")
    p_drift: float = field(0.03, help="per-event probability that a user's interests drift to a new topic")
    line_size: int = field(0, help="items per product line (named in their titles; successors stay in the line); 0 = no lines")
    conversion_rate: float = field(0.06, help="base probability that a click converts")
    chunk_users: int = field(50_000, help="users generated at once (bounds memory)")
    overwrite: bool = field(False, help="replace the events of an earlier run in --out")

    def __post_init__(self) -> None:
        for name in ("users", "items", "days", "chunk_users"):
            _positive(name, getattr(self, name))
        for name in ("shards", "workers", "topics", "line_size"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("mean_events", self.mean_events)
        for name in ("p_sequential", "p_drift", "conversion_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.popularity_alpha <= 0:
            raise ConfigError(f"popularity_alpha must be > 0, got {self.popularity_alpha}")
        if self.items < 20:
            raise ConfigError(f"items must be >= 20 for a meaningful catalogue, got {self.items}")
        _date("start_date", self.start_date)


@dataclass
class SessionizeConfig:
    """``cobra data sessionize``: day-partitioned events -> per-user sequences, out of core."""

    events: str = field(help="events folder (Parquet, hive-partitioned by day) or file")
    out: str = field(help="output folder for sequences shards")
    items: Optional[str] = field(None, help="items catalogue (Parquet); events of unknown items are dropped and counted")
    shards: int = field(0, help="output shards (files); users are hash-partitioned into them; 0 = auto, one per ~2M input events (shards of bounded size, whatever the number of users)")
    partitions: int = field(0, help="on-disk hash partitions of the shuffle (rounded up to a multiple of shards); 0 = auto (~2M events each)")
    event_types: list = field(["click"], help="event types that make up the sequences")
    workers: int = field(0, help="parallel processes for both phases; 0 = number of CPUs (one process below 1M rows)")
    strict: bool = field(False, help="fail on row-level problems instead of repairing and reporting them")
    min_items: int = field(1, help="users with fewer items are dropped (and counted)")
    batch_rows: int = field(1_000_000, help="rows read at once in the scatter phase (bounds memory)")

    def __post_init__(self) -> None:
        _positive("shards", self.shards, allow_zero=True)
        _positive("partitions", self.partitions, allow_zero=True)
        _positive("workers", self.workers, allow_zero=True)
        _positive("min_items", self.min_items)
        _positive("batch_rows", self.batch_rows)
        if not self.event_types:
            raise ConfigError("event_types must list at least one event type")


@dataclass
class SplitConfig:
    """``cobra data split``: sequences -> train / valid / test."""

    sequences: str = field(help="sequences folder or file (Parquet)")
    out: str = field(help="output folder: train/, valid/, test/")
    kind: str = field(
        "loo",
        help="'loo' (leave-one-out, public benchmarks), 'loo_cold' (leave-one-out with cold-start items held out of "
        "training) or 'time' (train days 1..D, test D+1)",
    )
    max_history: int = field(20, help="histories are truncated to the last N items")
    drop_last: int = field(
        0,
        help="loo: split each sequence without its last N items. drop_last=1 is a selection split in test's position: its "
        "test rows are the usual validation rows, and their histories end, as the usual test's do, in an item that no "
        "training example has as a target",
    )
    cold_fraction: float = field(0.05, help="loo_cold: fraction of the test-target items made cold-start items")
    seed: int = field(0, help="loo_cold: seed of the cold-start item draw")
    test_day: Optional[str] = field(None, help="time split: the test day (default: the last day present)")
    valid_day: Optional[str] = field(None, help="time split: the validation day (default: the day before test_day)")

    def __post_init__(self) -> None:
        if self.kind not in ("loo", "loo_cold", "time"):
            raise ConfigError(f"kind must be 'loo', 'loo_cold' or 'time', got '{self.kind}'")
        if not 0 < self.cold_fraction < 1:
            raise ConfigError(f"cold_fraction must be in (0, 1), got {self.cold_fraction}")
        _positive("max_history", self.max_history)
        if self.drop_last < 0:
            raise ConfigError(f"drop_last must be >= 0, got {self.drop_last}")
        if self.drop_last and self.kind != "loo":
            raise ConfigError(f"drop_last applies to kind=loo only, not '{self.kind}'")
        _date("test_day", self.test_day)
        _date("valid_day", self.valid_day)


@dataclass
class AmazonConfig:
    """``cobra data amazon``: import the S3-Rec format (sequences.txt + items.jsonl)."""

    src: str = field(help="folder holding sequences.txt and items.jsonl")
    out: str = field(help="output folder: items.parquet, sequences/, splits/loo/")
    max_history: int = field(20, help="histories are truncated to the last N items")
    shards: int = field(1, help="sequence shards to write")

    def __post_init__(self) -> None:
        _positive("max_history", self.max_history)
        _positive("shards", self.shards)


@dataclass
class ValidateConfig:
    """``cobra data validate``: check a table against its format and print a report."""

    path: str = field(help="Parquet file or folder")
    table: str = field("events", help="which format: events | items | sequences | examples")
    items: Optional[str] = field(None, help="catalogue to check item ids against")
    strict: bool = field(False, help="fail (exit 2) on any row-level problem instead of only counting it")
    report: Optional[str] = field(None, help="also write the report as JSON to this file")
    workers: int = field(0, help="parallel processes (events only); 0 = number of CPUs")

    def __post_init__(self) -> None:
        if self.table not in ("events", "items", "sequences", "examples"):
            raise ConfigError(f"table must be events|items|sequences|examples, got '{self.table}'")
        _positive("workers", self.workers, allow_zero=True)
