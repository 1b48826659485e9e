"""Config schemas of ``cobra train`` and ``cobra eval`` (dataclasses only)."""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError
from cobra_scale.model.config import CobraConfig


@dataclass
class InferenceConfig:
    """Coarse-to-fine inference settings (BeamFusion)."""

    mode: str = field("cobra", help="cobra | no_fusion | dense_only | sparse_only | liger")
    beams: int = field(20, help="M, beams (sparse IDs) per user")
    tau: float = field(1.0, help="BeamFusion temperature on beam scores")
    psi: float = field(20.0, help="BeamFusion temperature on cosine similarity")
    normalize: str = field("global", help="candidate softmax over 'global' (all beams) or 'per_beam'")

    def __post_init__(self) -> None:
        if self.mode not in ("cobra", "no_fusion", "dense_only", "sparse_only", "liger"):
            raise ConfigError(f"inference.mode must be cobra|no_fusion|dense_only|sparse_only|liger, got '{self.mode}'")
        if self.beams <= 0:
            raise ConfigError("inference.beams must be > 0")
        if self.normalize not in ("global", "per_beam"):
            raise ConfigError("inference.normalize must be 'global' or 'per_beam'")


@dataclass
class TrainConfig:
    """``cobra train``: train COBRA on a leave-one-out split, single process (CPU or one GPU)."""

    data: str = field(help="dataset folder: items.parquet and splits/<split>/{train,valid,test}")
    ids: str = field(help="semantic-ID folder of `cobra ids` (sids.parquet)")
    out: str = field(help="run folder: checkpoints/, best/, history.json, curve.png")
    split: str = field("loo", help="split folder under data/splits")
    items: Optional[str] = field(None, help="items catalogue (default: <data>/items.parquet)")
    epochs: int = field(30, help="max epochs")
    batch_size: int = field(512, help="training windows per step")
    lr: float = field(2e-3, help="AdamW peak learning rate")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    warmup_steps: int = field(200, help="linear warm-up steps, then cosine decay to 10%")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    seed: int = field(0, help="random seed")
    threads: int = field(0, help="torch CPU threads; 0 = all cores")
    device: str = field("auto", help="auto | cpu | cuda")
    precision: str = field("fp32", help="fp32 | bf16 (autocast; ~1.4x faster on CPUs with AVX512-BF16, standard on GPUs)")
    init_embeddings: bool = field(True, help="initialise token embeddings from all-MiniLM-L6-v2 (PCA-projected)")
    dedup_level: bool = field(False, help="append a code numbering items inside an ID (for the TIGER-like w/o Dense ablation)")
    eval_users: int = field(0, help="validation users per epoch (0 = all)")
    eval_every: int = field(1, help="validate every N epochs")
    patience: int = field(4, help="stop after this many validations without improvement of valid ndcg@10")
    max_minutes: float = field(0.0, help="wall-clock budget for training (0 = none); the best checkpoint is kept")
    resume: bool = field(True, help="resume from out/checkpoints/last if present")
    dense_loss_impl: str = field("auto", help="dense loss kernel: auto | reference | tiled | triton")
    model: CobraConfig = dc_field(default_factory=CobraConfig)
    inference: InferenceConfig = dc_field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device must be auto|cpu|cuda")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")


@dataclass
class EvalConfig:
    """``cobra eval``: evaluate a trained run on valid/test; choose tau/psi/beams on valid only."""

    run: str = field(help="run folder of `cobra train` (uses run/best)")
    out: Optional[str] = field(None, help="where to write eval.json (default: the run folder)")
    split_name: str = field("test", help="valid | test")
    batch_users: int = field(256, help="users per inference batch")
    max_users: int = field(0, help="evaluate a seeded sample of this many users (0 = all; report figures with 0)")
    exclude_history: bool = field(False, help="also mask the user's history items (the papers' protocol does not)")
    grid_tau: list = field([], help="tau values tried on valid (empty = the run's)")
    grid_psi: list = field([], help="psi values tried on valid (empty = the run's)")
    grid_beams: list = field([], help="beam counts tried on valid (empty = the run's)")
    modes: list = field(["cobra"], help="inference modes to report")

    def __post_init__(self) -> None:
        if self.split_name not in ("valid", "test"):
            raise ConfigError("split_name must be valid or test")


@dataclass
class RecommendConfig:
    """``cobra recommend``: top-K items for a history (or for users of a split), with titles."""

    run: str = field(help="run folder of `cobra train`")
    history: list = field([], help="item ids, oldest first, e.g. history=[12,40,7]")
    users: int = field(3, help="when no history is given: show this many users of the test split")
    k: int = field(10, help="items to return")
    exclude_history: bool = field(False, help="do not recommend items of the history")
    inference: InferenceConfig = dc_field(default_factory=InferenceConfig)
