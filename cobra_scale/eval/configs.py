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
