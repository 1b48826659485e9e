"""``ABRouter``: user id -> arms and the model version to serve. Pure Python, thread-safe.

The Serve ingress keeps one router, calls :meth:`ABRouter.route` per request and
:meth:`ABRouter.reconfigure` from its ``reconfigure(user_config)``::

    router = ABRouter(load_ab_config("configs/ab/beamfusion.yaml"), known_models=["cobra", "cobra_no_fusion"])
    route = router.route(user_id)        # Route(model='cobra_no_fusion', experiment='beamfusion', arm='no_fusion', ...)
    router.reconfigure(new_config_dict)  # new shares; only the buckets that change hands move

Routing is a pure function of (config, user id): every replica, process and restart that
holds the same config routes a user identically. A lookup costs one blake2b per layer
plus a list index (a few microseconds).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cobra_scale.ab.bucketing import HOLDOUT_LAYER, bucket_of, canonical_user_id, layer_table
from cobra_scale.ab.configs import DEFAULT_ARM, HOLDOUT_ARM, ABConfig
from cobra_scale.config import load_config
from cobra_scale.errors import ConfigError


def load_ab_config(path: str) -> ABConfig:
    """Read and validate an experiments file (YAML)."""
    return load_config(ABConfig, path)


def ab_config_from_dict(data: Mapping[str, Any]) -> ABConfig:
    """Validate an experiments config given as a dict (e.g. a Serve ``user_config``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"A/B config must be a mapping, got {type(data).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ABConfig), OmegaConf.create(dict(data)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"A/B config is missing {', '.join(missing)}")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"invalid A/B config: {msg}") from exc


def ab_config_to_dict(cfg: ABConfig) -> dict:
    """Plain-dict form of a config (what to put in a Serve ``user_config``)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


@dataclass(frozen=True)
class Route:
    """Where one request goes.

    ``experiment``/``arm`` name the experiment that chose the model (or, if none did, the
    first experiment the user is in); users in no experiment get ``experiment=None`` and arm
    ``"default"`` (``"holdout"`` in the global holdout). ``arms`` lists every experiment the
    user is in, one per layer.
    """

    user_id: str | None  # canonical id; None when absent or invalid
    model: str | None  # model version; None = the server's default
    experiment: str | None
    arm: str
    arms: dict[str, str] = field(default_factory=dict)  # experiment -> arm
    params: dict[str, Any] = field(default_factory=dict)  # request overrides of the user's arms

    def exposures(self) -> list[tuple[str | None, str]]:
        """``(experiment, arm)`` rows for the exposure log: one per experiment, or one default row."""
        return list(self.arms.items()) or [(None, self.arm)]


class _Plan:
    """Immutable lookup tables built from one config (swapped atomically on reconfigure)."""

    def __init__(self, cfg: ABConfig):
        self.cfg = cfg
        self.layers = [(name, layer_table(cfg, name)) for name in cfg.layers]
        self.holdout_buckets = cfg.holdout_buckets
        self.names = [(e.name, [a.name for a in e.arms]) for e in cfg.experiments]
        self.models = [[a.model for a in e.arms] for e in cfg.experiments]
        self.params = [[dict(a.params) for a in e.arms] for e in cfg.experiments]


class ABRouter:
    """Routes user ids to arms and model versions by an :class:`ABConfig`.

    Args:
        config: an ABConfig, or a dict of one (validated).
        known_models: model versions the server can serve; a config routing to any other
            version is rejected (at construction and on every reconfigure).
    """

    def __init__(self, config: ABConfig | Mapping[str, Any], known_models: Iterable[str] | None = None):
        self.known_models = set(known_models) if known_models is not None else None
        self._lock = threading.Lock()  # serialises reconfigure; route() reads one reference
        self._plan = self._build(config)

    def _build(self, config: ABConfig | Mapping[str, Any]) -> _Plan:
        cfg = config if isinstance(config, ABConfig) else ab_config_from_dict(config)
        if self.known_models is not None:
            unknown = [m for m in cfg.models() if m not in self.known_models]
            if unknown:
                raise ConfigError(f"A/B config routes to unknown model version(s) {', '.join(unknown)} (served: {', '.join(sorted(self.known_models))})")
        return _Plan(cfg)

    @property
    def config(self) -> ABConfig:
        return self._plan.cfg

    def reconfigure(self, config: ABConfig | Mapping[str, Any]) -> ABConfig:
        """Validate ``config`` and switch to it atomically; a bad config leaves the old one in place."""
        plan = self._build(config)
        with self._lock:
            self._plan = plan
        return plan.cfg

    def route(self, user_id: Any) -> Route:
        """The route of ``user_id`` (any id type; absent/invalid ids get the default route)."""
        plan = self._plan  # one read: a concurrent reconfigure never mixes two configs
        cfg = plan.cfg
        key = canonical_user_id(user_id)
        if key is None:
            return Route(None, cfg.default_model, None, DEFAULT_ARM)
        if plan.holdout_buckets and bucket_of(key, cfg.salt, HOLDOUT_LAYER, cfg.buckets) < plan.holdout_buckets:
            return Route(key, cfg.default_model, None, HOLDOUT_ARM)
        arms: dict[str, str] = {}
        params: dict[str, Any] = {}
        model, chooser = None, None
        for layer, table in plan.layers:
            owner = table[bucket_of(key, cfg.salt, layer, cfg.buckets)]
            if owner is None:
                continue
            e_idx, a_idx = owner
            exp_name, arm_names = plan.names[e_idx]
            arms[exp_name] = arm_names[a_idx]
            params.update(plan.params[e_idx][a_idx])
            if plan.models[e_idx][a_idx] is not None:
                model, chooser = plan.models[e_idx][a_idx], exp_name
        if not arms:
            return Route(key, cfg.default_model, None, DEFAULT_ARM)
        experiment = chooser or next(iter(arms))
        return Route(key, model or cfg.default_model, experiment, arms[experiment], arms, params)

    def describe(self) -> dict:
        """Share of traffic per (experiment, arm) and the holdout, for health endpoints and logs."""
        cfg = self._plan.cfg
        in_play = 1.0 - cfg.holdout_buckets / cfg.buckets
        out: dict[str, Any] = {"salt": cfg.salt, "buckets": cfg.buckets, "holdout": cfg.holdout_buckets / cfg.buckets, "experiments": {}}
        for e in cfg.experiments:
            out["experiments"][e.name] = {
                "layer": e.layer,
                "traffic": in_play * e.size / cfg.buckets,
                "arms": {a.name: {"share": a.share, "model": a.model, "params": dict(a.params)} for a in e.arms},
            }
        return out
