"""Config schemas of the Serve application and of ``cobra serve`` (dataclasses only)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError
from cobra_scale.train.configs import InferenceConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class AppConfig:
    """The Serve application (the ``args`` of ``cluster/serve_config.yaml``'s builder)."""

    run: str = field(help="run folder of `cobra train` (serves run/best; the serving bundle goes to run/serving)")
    version: Optional[str] = field(None, help="model version label in responses (default: <run name>@<weights sha256[:8]>)")
    replicas: int = field(1, help="recommender replicas")
    shards: int = field(1, help="index shard deployments over item ranges (0 = exact index inside each recommender)")
    shard_replicas: int = field(1, help="replicas of each index shard")
    index_kind: str = field("exact", help="index of each shard (see serve.shards.INDEX_KINDS)")
    max_batch_size: int = field(32, help="requests per batched beam search (1 = no batching)")
    batch_wait_timeout_s: float = field(0.005, help="how long a batch waits to fill")
    max_ongoing_requests: int = field(64, help="requests in flight per recommender replica (>= max_batch_size for full batches)")
    recommender_cpus: float = field(1.0, help="Ray CPUs per recommender replica")
    shard_cpus: float = field(0.25, help="Ray CPUs per index shard replica")
    ingress_cpus: float = field(0.1, help="Ray CPUs of the HTTP ingress")
    gpus_per_replica: float = field(-1.0, help="GPUs per recommender replica; -1 = the cluster's GPUs shared by the replicas (at most 1 each; 0 with none or device=cpu)")
    threads: int = field(0, help="torch CPU threads per recommender replica (0 = torch default)")
    device: str = field("auto", help="auto | cpu | cuda (recommender replicas)")
    history_table: Optional[str] = field(None, help="Parquet of user histories for user_id requests (an examples or sequences table)")
    max_k: int = field(200, help="largest k a request may ask for")
    max_history: int = field(0, help="longest history a request may send (0 = the model's window, max_items - 1)")
    max_beams: int = field(256, help="largest beams a request may ask for")
    max_body_bytes: int = field(65536, help="request bodies above this size get 413")
    exclude_history: bool = field(False, help="default: do not recommend the history's own items")
    inference: dict = field({}, help="inference settings over the served run's own (its config.yaml `inference`, as `cobra eval` "
                            "uses them): any of its keys, e.g. inference.beams=160 inference.psi=40")
    user_config: dict = field({}, help="recommender user_config overrides (tau, psi, beams, mode, run, max_batch_size, ...)")

    def __post_init__(self) -> None:
        known = {f.name for f in fields(InferenceConfig)}
        unknown = sorted(str(k) for k in self.inference if k not in known)
        if unknown:
            raise ConfigError(f"inference: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
        for name in ("replicas", "shard_replicas", "max_batch_size", "max_ongoing_requests", "max_k", "max_beams", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.shards < 0 or self.max_history < 0 or self.threads < 0:
            raise ConfigError("shards, max_history and threads must be >= 0")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError("batch_wait_timeout_s must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device must be auto|cpu|cuda")
        if self.device == "cuda" and self.gpus_per_replica == 0:
            raise ConfigError("device=cuda needs a GPU share per replica: gpus_per_replica > 0, or -1 (the cluster's GPUs shared)")
        if self.device == "cpu" and self.gpus_per_replica > 0:
            raise ConfigError("device=cpu with gpus_per_replica > 0 would reserve GPUs that no replica uses")
        if self.recommender_cpus < 0 or self.shard_cpus < 0 or self.ingress_cpus < 0:
            raise ConfigError("CPU reservations must be >= 0")


@dataclass
class ServeConfig(AppConfig):
    """``cobra serve``: serve a trained run over HTTP with Ray Serve (in-process Ray on 127.0.0.1, or $RAY_ADDRESS)."""

    host: str = field("127.0.0.1", help="HTTP bind address (loopback by default; anything else exposes the service)")
    port: int = field(8000, help="HTTP port")
    app_name: str = field("cobra", help="Serve application name")
    ray_temp_dir: Optional[str] = field(None, help="temp dir of the in-process Ray (default: a fresh /tmp/cobra_serve_*)")
    ready_timeout_s: float = field(300.0, help="how long to wait for /readyz before giving up")
    detach: bool = field(False, help="with $RAY_ADDRESS: deploy and return, leaving the app running on the cluster")
    duration_s: float = field(0.0, help="stop after this many seconds (0 = until Ctrl-C / SIGTERM)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ConfigError("port must be in 1..65535")


def app_fields(cfg: Any) -> dict:
    """The :class:`AppConfig` part of a config object (drops ``cobra serve``'s own keys)."""
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AppConfig)}


__all__ = ["AppConfig", "LOOPBACK_HOSTS", "ServeConfig", "app_fields"]
