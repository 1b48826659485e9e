"""Config schemas of the baselines (dataclasses only: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


@dataclass
class SASRecConfig:
    """``cobra baseline sasrec``: SASRec with full-softmax cross-entropy, trained and evaluated on a leave-one-out split."""

    out: str = field(help="output folder: model.safetensors (best epoch), model.json, results.json, config.yaml")
    data: str = field("data/beauty", help="dataset folder holding items.parquet and splits/<split>/{train,valid,test}")
    split: str = field("loo", help="split sub-folder under <data>/splits")
    # model
    d_model: int = field(128, help="embedding / hidden width")
    heads: int = field(2, help="attention heads (d_model must be divisible by heads)")
    blocks: int = field(2, help="self-attention blocks")
    ffn_dim: Optional[int] = field(None, help="feed-forward width; None = d_model (as in SASRec)")
    dropout: float = field(0.5, help="dropout on embeddings, attention weights, and block outputs")
    norm: str = field("pre", help="'pre' (LayerNorm before each sub-layer, final LayerNorm) or 'post' (after each residual)")
    scale_embeddings: bool = field(True, help="multiply input item embeddings by sqrt(d_model) (as in SASRec)")
    max_history: int = field(20, help="history items a prediction sees (training windows and evaluation)")
    # optimisation
    lr: float = field(1e-3, help="Adam learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay (0 = plain Adam, as in SASRec)")
    batch_size: int = field(128, help="training windows (sequences of up to max_history+1 items) per step")
    epochs: int = field(200, help="maximum training epochs")
    patience: int = field(10, help="stop after this many evaluations without a better validation select_metric")
    eval_every: int = field(1, help="evaluate on validation every this many epochs")
    select_metric: str = field("ndcg@10", help="validation metric (unmasked) that picks the best epoch")
    ks: list = field([5, 10], help="cut-offs K of Recall@K / NDCG@K")
    max_minutes: float = field(0.0, help="wall-clock training budget in minutes (0 = none); when exceeded, training stops and the best epoch is still tested")
    eval_batch_size: int = field(1024, help="users per evaluation batch")
    # runtime
    seed: int = field(0, help="random seed (init, dropout, shuffling)")
    device: str = field("auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")
    threads: int = field(0, help="torch CPU threads (0 = all cores)")
    progress: bool = field(True, help="tqdm progress bars")

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "blocks", "max_history", "batch_size", "epochs", "patience", "eval_every", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ConfigError(f"ffn_dim must be > 0 or null, got {self.ffn_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("pre", "post"):
            raise ConfigError(f"norm must be 'pre' or 'post', got '{self.norm}'")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0 and weight_decay >= 0")
        if self.max_minutes < 0 or self.threads < 0:
            raise ConfigError("max_minutes and threads must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto|cpu|cuda, got '{self.device}'")
        if not self.ks or any(int(k) <= 0 for k in self.ks):
            raise ConfigError(f"ks must be a non-empty list of positive cut-offs, got {list(self.ks)}")
        names = [f"{m}@{int(k)}" for k in self.ks for m in ("recall", "ndcg")]
        if self.select_metric not in names:
            raise ConfigError(f"select_metric must be one of {names}, got '{self.select_metric}'")
