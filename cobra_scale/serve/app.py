"""The Serve application builder: ``import_path: cobra_scale.serve.app:build_app``.

``serve run cluster/serve_config.yaml`` / ``serve deploy`` call :func:`build_app` with the
YAML's ``args`` (an :class:`~cobra_scale.serve.configs.AppConfig`); ``cobra serve`` calls it
with its own config. It checks the run, builds the serving bundle once (item vectors
encoded by the run's text encoder), and wires Ingress -> Recommender -> IndexShard*.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cobra_scale.config import config_from_mapping, load_config
from cobra_scale.errors import ConfigError
from cobra_scale.serve.configs import AppConfig, app_fields
from cobra_scale.serve.schemas import Limits, first_error_line

log = logging.getLogger(__name__)

DEFAULT_SLOT = "default"


def app_config(args: Any) -> AppConfig:
    """``args`` (dict from YAML, or a config object) -> a validated :class:`AppConfig`."""
    if isinstance(args, AppConfig):
        return AppConfig(**app_fields(args))
    return config_from_mapping(AppConfig, args)


def run_config(run: Path):
    """The served run's :class:`~cobra_scale.train.configs.TrainConfig` (its ``config.yaml``)."""
    from cobra_scale.train.configs import TrainConfig

    return load_config(TrainConfig, run / "config.yaml")


def model_window(run: Path) -> int:
    """History items the run's model reads (``max_items - 1``)."""
    return run_config(run).model.max_items - 1


def limits_for(cfg: AppConfig, run: Path) -> Limits:
    return Limits(max_k=cfg.max_k, max_history=cfg.max_history or model_window(run), max_beams=cfg.max_beams, max_body_bytes=cfg.max_body_bytes)


def served_inference(cfg: AppConfig, run: Path):
    """The run's own inference settings (``config.yaml``'s ``inference``, what `cobra eval` uses) with the app's
    ``inference`` keys over them (AppConfig has checked the keys; InferenceConfig checks the values)."""
    import dataclasses

    return dataclasses.replace(run_config(run).inference, **{str(k): v for k, v in dict(cfg.inference).items()})


def base_settings(cfg: AppConfig, run: Path) -> dict:
    """The recommender's base :class:`~cobra_scale.serve.engine.Settings` (``user_config`` overrides it)."""
    inf = served_inference(cfg, run)
    return {
        "run": str(run), "version": cfg.version, "mode": inf.mode, "beams": inf.beams, "tau": inf.tau, "psi": inf.psi,
        "normalize": inf.normalize, "prior_weight": inf.prior_weight, "free_query_weight": inf.free_query_weight,
        "free_mix_weight": inf.free_mix_weight, "free_mix_candidates": inf.free_mix_candidates, "max_per_id": inf.max_per_id, "exclude_history": cfg.exclude_history, "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s, "threads": cfg.threads, "device": cfg.device,
    }


def _gpus(cfg: AppConfig) -> float:
    """GPUs each recommender replica reserves: ``gpus_per_replica``, or for -1 the cluster's GPUs shared by the
    replicas (at most one each; two replicas on a one-GPU machine get half each rather than one left pending)."""
    if cfg.device == "cpu":
        return 0.0
    if cfg.gpus_per_replica >= 0:
        return cfg.gpus_per_replica
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return min(1.0, gpus / cfg.replicas) if gpus else 0.0


def build_app(args: Any):
    """Build the Serve application graph for ``args`` (see :class:`AppConfig`)."""
    from cobra_scale.serve.bundle import ensure_bundle
    from cobra_scale.serve.deployments import IndexShardDeployment, IngressDeployment, RecommenderDeployment
    from cobra_scale.serve.engine import Settings

    cfg = app_config(args)
    run = Path(cfg.run).expanduser().resolve()  # replicas may run in another working directory
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"run folder {cfg.run} has no config.yaml (train with `cobra train` first)")
    if cfg.history_table and not Path(cfg.history_table).exists():
        raise ConfigError(f"history_table {cfg.history_table} not found")
    folder = ensure_bundle(run)
    num_shards = cfg.shards
    if num_shards and not json.loads((folder / "bundle.json").read_text())["dim"]:
        log.info("%s has no dense item vectors (sparse-only model): no index shards", run)
        num_shards = 0
    limits = limits_for(cfg, run)
    settings = base_settings(cfg, run)
    try:  # fail here, once, rather than in every replica
        Settings(**{**settings, **cfg.user_config})
    except ValidationError as exc:
        raise ConfigError(f"invalid recommender settings / user_config: {first_error_line(exc.errors())}") from exc
    shards = [
        IndexShardDeployment.options(name=f"IndexShard{i}", num_replicas=cfg.shard_replicas, ray_actor_options={"num_cpus": cfg.shard_cpus})
        .bind(i, num_shards, cfg.index_kind, str(folder))
        for i in range(num_shards)
    ]
    recommender = RecommenderDeployment.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.recommender_cpus, "num_gpus": _gpus(cfg)},
        user_config=dict(cfg.user_config),
    ).bind(settings, shards)
    history = str(Path(cfg.history_table).resolve()) if cfg.history_table else None
    ingress = IngressDeployment.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}).bind({DEFAULT_SLOT: recommender}, DEFAULT_SLOT, limits.__dict__, history)
    log.info("app: %d recommender replica(s), %d index shard(s), limits %s", cfg.replicas, num_shards, limits)
    return ingress


__all__ = ["DEFAULT_SLOT", "app_config", "base_settings", "build_app", "limits_for", "served_inference"]
