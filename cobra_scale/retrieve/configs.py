"""Config schema of ``cobra index`` (dataclasses only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


@dataclass
class IndexConfig:
    """``cobra index``: build the sharded faiss IVF index (one list per sparse ID) of a catalogue's item vectors."""

    out: str = field(help="index folder: index.json, lists.safetensors, shard-SSSSS.{faiss,json}, items.safetensors")
    run: Optional[str] = field(None, help="run folder of `cobra train`: item vectors from its best model's encoder")
    vectors: Optional[str] = field(None, help="instead of a run: exported item vectors (safetensors with item_ids (N,) and vectors (N, d))")
    sids: Optional[str] = field(None, help="with --vectors: sids.parquet of `cobra ids` (item_id, sid, code_*)")
    shards: int = field(1, help="shards, split by item range")
    kind: str = field("flat", help="flat (exact cosine inside an ID) | pq (product-quantised, less memory)")
    pq_m: int = field(16, help="pq: sub-quantisers (bytes per item at 8 bits); must divide the vector dimension")
    pq_bits: int = field(8, help="pq: bits per sub-quantiser code")
    train_size: int = field(100_000, help="pq: vectors sampled to train the codebooks")
    max_per_id: int = field(0, help="candidates per sparse ID returned to BeamFusion (0 = every item of the ID, exact; cap it when IDs hold thousands of items)")
    device: str = field("auto", help="auto | cpu | cuda: encoding (torch) and search copies (faiss GPU build)")
    encode_batch: int = field(2048, help="items per encoder batch (run source)")
    save_items: bool = field(True, help="also write items.safetensors (item ids, codes, raw vectors) so eval and serving skip re-encoding")
    overwrite: bool = field(False, help="replace an existing index folder")
    seed: int = field(0, help="seed of the pq training sample")

    def __post_init__(self) -> None:
        if (self.run is None) == (self.vectors is None):
            raise ConfigError("give exactly one source: --run RUN or --vectors FILE --sids sids.parquet")
        if self.vectors is not None and self.sids is None:
            raise ConfigError("--vectors needs --sids (the sids.parquet of `cobra ids`)")
        if self.kind not in ("flat", "pq"):
            raise ConfigError(f"kind must be flat or pq, got '{self.kind}'")
        if self.shards < 1:
            raise ConfigError("shards must be >= 1")
        if self.max_per_id < 0:
            raise ConfigError("max_per_id must be >= 0")
        if self.pq_m < 1 or not 1 <= self.pq_bits <= 16 or self.train_size < 1:
            raise ConfigError("pq_m and train_size must be >= 1, pq_bits in [1, 16]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device must be auto|cpu|cuda")


@dataclass
class PriorConfig:
    """``cobra prior``: count a run's training transitions (item b after item a) into ``<run>/prior``, for ``prior_weight``."""

    run: str = field(help="run folder of `cobra train` (its data and split name the training sequences)")
    index: Optional[str] = field(None, help="index folder with items.safetensors: take the catalogue from there (no tokenising)")
    window: int = field(3, help="b counts when it follows a within this many steps")
    context: int = field(3, help="last history items whose transitions score a user")
    decay: float = field(0.3, help="weight of each older context item relative to the next (most recent = 1)")
    overwrite: bool = field(False, help="recount an existing <run>/prior")

    def __post_init__(self) -> None:
        if self.window < 1 or self.context < 1:
            raise ConfigError("window and context must be >= 1")
        if not 0 < self.decay <= 1:
            raise ConfigError("decay must lie in (0, 1]")
