"""Config schemas of the evaluation commands that compare several runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


@dataclass
class ColdStartConfig:
    """``cobra coldstart``: Recall/NDCG by target segment (in-set vs cold-start items).

    The runs must be trained on a ``loo_cold`` split (``cobra data split kind=loo_cold``),
    whose ``cold_items.parquet`` names the items kept out of training.
    """

    run: str = field(help="run of the full model (modes cobra, liger, no_fusion)")
    sparse_run: Optional[str] = field(None, help="run trained w/o Dense on item-unique IDs (mode sparse_only, TIGER-like)")
    dense_run: Optional[str] = field(None, help="run trained w/o ID (mode dense_only)")
    modes: list = field(["cobra", "liger", "no_fusion"], help="modes of the full model to report")
    liger_beams: int = field(20, help="K, the beam IDs whose items LIGER ranks (LIGER uses 20)")
    split_name: str = field("test", help="valid | test")
    max_users: int = field(0, help="evaluate a seeded sample of this many users (0 = all)")
    max_segment_users: int = field(0, help="then at most this many users of each segment, a seeded sample (0 = all): the cold segment is small, in-set is not")
    batch_users: int = field(256, help="users per inference batch")
    exclude_history: bool = field(False, help="mask the user's history items from the ranking")
    out: Optional[str] = field(None, help="where to write coldstart.json / coldstart.md (default: the full model's run)")

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in ("cobra", "liger", "no_fusion")]
        if bad:
            raise ConfigError(f"modes of the full model must be among cobra, liger, no_fusion; got {bad}")
        if self.liger_beams <= 0 or self.max_users < 0 or self.max_segment_users < 0 or self.batch_users <= 0:
            raise ConfigError("liger_beams and batch_users must be > 0, max_users and max_segment_users >= 0")
        if self.split_name not in ("valid", "test"):
            raise ConfigError(f"split_name must be valid or test, got {self.split_name!r}")


@dataclass
class CompareConfig:
    """``cobra compare``: the paired difference B − A of two evaluations over the same users.

    A and B are ``per_user_<split>.parquet`` files of ``cobra eval per_user=true`` (or the
    folders holding one). Each metric's mean difference gets a paired normal interval and a
    paired bootstrap interval over users: whether a gap between two runs exceeds the sampling
    of the users and their targets.
    """

    a: str = field(help="per-user file of run A (or its eval folder)")
    b: str = field(help="per-user file of run B (or its eval folder)")
    split_name: str = field("test", help="valid | test: which per_user_<split_name>.parquet to read from a folder")
    setting: str = field("cobra", help="the setting (mode, e.g. cobra, cobra|masked, sparse_only) compared in A")
    setting_b: Optional[str] = field(None, help="the setting compared in B (default: the same as A's)")
    metrics: list = field(["recall@10", "ndcg@10"], help="metrics compared, each on its own")
    combined: bool = field(True, help="also compare the per-user sum of the metrics (e.g. R@10 + N@10) when there are several")
    intersect: bool = field(False, help="compare on the users both files scored; by default the two user sets must be equal")
    resamples: int = field(10_000, help="bootstrap resamples of the users")
    confidence: float = field(0.95, help="level of both intervals")
    seed: int = field(0, help="seed of the bootstrap")
    out: Optional[str] = field(None, help="also write the result as JSON here")

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("metrics must name at least one metric, e.g. metrics=[recall@10,ndcg@10]")
        if self.resamples < 1 or not 0 < self.confidence < 1:
            raise ConfigError("resamples must be >= 1 and confidence in (0, 1)")
        if self.split_name not in ("valid", "test"):
            raise ConfigError(f"split_name must be valid or test, got {self.split_name!r}")
