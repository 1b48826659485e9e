"""The A/B Serve application: model slots side by side behind a routing ingress.

``import_path: cobra_scale.serve.ab_app:build_ab_app`` (args: an
:class:`~cobra_scale.ab.configs.ABAppConfig`)::

    ABIngress (FastAPI: the same API as the plain app; responses name experiment and arm)
      ├─ handle "cobra"           ─> Recommender_cobra            ─┐
      └─ handle "cobra_no_fusion" ─> Recommender_cobra_no_fusion  ─┴─> IndexShard 0..N-1 (shared)

Each slot is a :class:`~cobra_scale.serve.deployments.RecommenderDeployment` whose
settings are the app's plus the slot's overrides (another ``mode``, ``tau``, or ``run``).
The experiments file travels as the ingress's ``user_config["ab"]``: editing shares there
(``serve deploy`` of the changed config, or ``serve.run`` again) re-routes live traffic
without restarting a replica. The ingress writes the exposure log and closes it (flushing
every row) when Serve shuts the replica down.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from cobra_scale.ab.exposure import ExposureLogger
from cobra_scale.ab.router import ab_config_to_dict, load_ab_config
from cobra_scale.ab.serving import ABServiceBackend, ab_app_config, check_arm_params, serve_config  # noqa: F401 (re-exported)
from cobra_scale.errors import ConfigError
from cobra_scale.serve.api import build_api
from cobra_scale.serve.app import _gpus, base_settings, limits_for
from cobra_scale.serve.deployments import HandleModel, IndexShardDeployment, RecommenderDeployment, loopback_replica_grpc
from cobra_scale.serve.schemas import Limits, first_error_line
from cobra_scale.serve.service import HistoryTable

log = logging.getLogger(__name__)


@serve.deployment(name="ABIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class ABIngressDeployment:
    """HTTP JSON ingress that routes each request to a model slot by the user's A/B arm."""

    def __init__(self, models: dict, default: str, limits: dict, history_table: str | None = None, exposures: str | None = None, flush_s: float = 2.0):
        loopback_replica_grpc()
        histories = HistoryTable.load(history_table) if history_table else None
        logger = ExposureLogger(exposures, flush_interval_s=flush_s) if exposures else None
        # The experiments arrive only through user_config (reconfigure runs before the replica
        # takes traffic), so changing them is a user_config update, never a replica restart.
        self.backend = ABServiceBackend({n: HandleModel(h) for n, h in models.items()}, default, Limits(**limits), {"salt": "unconfigured"}, logger, histories)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config = {"ab": <experiments config>}``: new shares / experiments, applied atomically."""
        if not user_config or "ab" not in user_config:
            log.warning("A/B ingress user_config has no 'ab' key: every request takes the default route")
            return
        self.backend.reconfigure(user_config["ab"])

    def __serve_build_asgi_app__(self):
        return build_api(self.backend, self.backend.limits, title="cobra_scale recommendations (A/B)")

    def __del__(self):  # Serve calls this on a graceful replica shutdown: write every buffered exposure
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def build_ab_app(args: Any):
    """Build the A/B application graph for ``args`` (see :class:`ABAppConfig`)."""
    from cobra_scale.serve.bundle import ensure_bundle
    from cobra_scale.serve.engine import Settings

    cfg = ab_app_config(args)
    run = Path(cfg.run).expanduser().resolve()
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"run folder {cfg.run} has no config.yaml (train with `cobra train` first)")
    if cfg.history_table and not Path(cfg.history_table).exists():
        raise ConfigError(f"history_table {cfg.history_table} not found")
    ab = load_ab_config(cfg.experiments)
    limits = limits_for(cfg, run)
    check_arm_params(ab, limits)
    unknown = [m for m in ab.models() if m not in cfg.models]
    if unknown:
        raise ConfigError(f"{cfg.experiments} routes to model(s) {', '.join(unknown)} that the app does not serve (models: {', '.join(cfg.models)})")
    base = base_settings(cfg, run)
    slot_settings = {}
    for name, overrides in cfg.models.items():
        settings = {**base, **cfg.user_config, **overrides}
        if "run" in overrides:
            settings["run"] = str(Path(overrides["run"]).expanduser().resolve())
            ensure_bundle(Path(settings["run"]))
        try:
            Settings(**settings)
        except ValidationError as exc:
            raise ConfigError(f"models.{name}: invalid recommender settings: {first_error_line(exc.errors())}") from exc
        slot_settings[name] = settings
    folder = ensure_bundle(run)
    shards = [
        IndexShardDeployment.options(name=f"IndexShard{i}", num_replicas=cfg.shard_replicas, ray_actor_options={"num_cpus": cfg.shard_cpus})
        .bind(i, cfg.shards, cfg.index_kind, str(folder))
        for i in range(cfg.shards)
    ]
    slots = {
        name: RecommenderDeployment.options(
            name=f"Recommender_{name}",
            num_replicas=cfg.replicas,
            max_ongoing_requests=cfg.max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.recommender_cpus, "num_gpus": _gpus(cfg)},
        ).bind(settings, shards)
        for name, settings in slot_settings.items()
    }
    default = ab.default_model or cfg.default_slot or next(iter(cfg.models))
    history = str(Path(cfg.history_table).resolve()) if cfg.history_table else None
    exposures = str(Path(cfg.exposures).expanduser().resolve()) if cfg.exposures else None
    ingress = ABIngressDeployment.options(
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
        user_config={"ab": ab_config_to_dict(ab)},
    ).bind(slots, default, limits.__dict__, history, exposures, cfg.exposure_flush_s)
    log.info("A/B app: slots %s, experiments %s, exposures -> %s", list(slots), [e.name for e in ab.experiments], exposures)
    return ingress


__all__ = ["ABIngressDeployment", "ab_app_config", "build_ab_app", "serve_config"]  # the last two re-exported from ab.serving
