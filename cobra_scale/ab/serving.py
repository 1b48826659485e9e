"""The A/B ingress logic, without Ray: route by user, ask that arm's model slot, log the exposure.

:class:`ABServiceBackend` extends the serving layer's
:class:`~cobra_scale.serve.service.ServiceBackend` (named model slots, user-history lookup,
error shapes). Per request:

1. ``route = router.route(request.user_id)`` — requests that send ``items`` without a
   ``user_id`` carry no user and take the default route (``default_model``, arm
   ``"default"``); a request naming a ``model`` explicitly is served by that slot, outside
   every experiment (arm ``"explicit"``);
2. the arm's ``params`` (e.g. ``tau``) fill the request fields the client left unset;
3. the slot named by ``route.model`` answers; the response gains ``experiment`` and ``arm``;
4. one exposure row per experiment the user is in goes to the
   :class:`~cobra_scale.ab.exposure.ExposureLogger` (a buffer append; disk is written by
   the logger's thread).

:meth:`ABServiceBackend.reconfigure` swaps the experiments config (the ingress
deployment's ``user_config["ab"]``) without a redeploy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from pydantic import ValidationError

from cobra_scale.ab.bucketing import canonical_user_id
from cobra_scale.ab.configs import EXPLICIT_ARM, ABAppConfig, ABConfig
from cobra_scale.ab.exposure import ExposureLogger
from cobra_scale.ab.router import ABRouter, Route
from cobra_scale.config import config_from_mapping
from cobra_scale.errors import ConfigError
from cobra_scale.serve.schemas import Limits, first_error_line, request_model
from cobra_scale.serve.service import HistoryTable, ModelClient, ServiceBackend

log = logging.getLogger(__name__)

ARM_PARAMS = ("mode", "beams", "tau", "psi", "exclude_history")  # request fields an arm may set


def check_arm_params(cfg: ABConfig, limits: Limits) -> None:
    """Every arm's ``params`` must be request fields with values a client could send."""
    request_cls = request_model(limits)
    for exp in cfg.experiments:
        for arm in exp.arms:
            bad = sorted(set(arm.params) - set(ARM_PARAMS))
            if bad:
                raise ConfigError(f"experiment '{exp.name}' arm '{arm.name}': params {', '.join(bad)} are not request settings ({', '.join(ARM_PARAMS)})")
            try:
                request_cls(items=[0], **arm.params)
            except ValidationError as exc:
                raise ConfigError(f"experiment '{exp.name}' arm '{arm.name}': params {first_error_line(exc.errors())}") from exc


class ABServiceBackend(ServiceBackend):
    """A :class:`ServiceBackend` whose model slot is chosen by an :class:`ABRouter`.

    Args:
        models: slot name -> client; every model the experiments config routes to must be one.
        default: the slot for users in no experiment when the config names no ``default_model``.
        limits, histories: as for :class:`ServiceBackend`.
        ab: the experiments config (an ABConfig or its dict).
        exposures: exposure logger (None: log nothing).
    """

    def __init__(
        self,
        models: dict[str, ModelClient],
        default: str,
        limits: Limits,
        ab: ABConfig | Mapping[str, Any],
        exposures: ExposureLogger | None = None,
        histories: HistoryTable | None = None,
        ready_timeout_s: float = 5.0,
    ):
        super().__init__(models, default, limits, histories, ready_timeout_s)
        self.router = ABRouter(ab, known_models=models)
        check_arm_params(self.router.config, limits)
        self.exposures = exposures

    def reconfigure(self, ab: ABConfig | Mapping[str, Any]) -> ABConfig:
        """Switch to a new experiments config; an invalid one raises and leaves the old in place."""
        router = ABRouter(ab, known_models=self.model_clients)  # validate fully before swapping
        check_arm_params(router.config, self.limits)
        cfg = self.router.reconfigure(router.config)
        log.info("A/B config updated: %s", {e.name: {a.name: round(a.share, 4) for a in e.arms} for e in cfg.experiments})
        return cfg

    def route_of(self, request: Any) -> Route:
        if request.model is not None:
            return Route(canonical_user_id(request.user_id), request.model, None, EXPLICIT_ARM)
        return self.router.route(request.user_id)

    async def recommend(self, request: Any) -> dict:
        route = self.route_of(request)
        updates: dict[str, Any] = {"model": route.model or self.default}
        for key, value in route.params.items():
            if getattr(request, key) is None:  # the client's explicit setting wins
                updates[key] = value
        result = await super().recommend(request.model_copy(update=updates))
        result["experiment"], result["arm"] = route.experiment, route.arm
        if self.exposures is not None:
            items = result["items"]
            self.exposures.log_route(route, [it["item_id"] for it in items], [it["score"] for it in items])
        return result

    async def models(self) -> dict:
        out = await super().models()
        out["ab"] = {**self.router.describe(), "ingress_pid": os.getpid()}
        if self.exposures is not None:
            out["exposures"] = {"folder": str(self.exposures.out_dir), **self.exposures.stats}
        return out

    def close(self) -> None:
        """Flush and close the exposure log (the ingress calls this on shutdown)."""
        if self.exposures is not None:
            self.exposures.close()


def ab_app_config(args: Any) -> ABAppConfig:
    """``args`` (dict from YAML, or a config object) -> a validated :class:`ABAppConfig`."""
    if isinstance(args, ABAppConfig):
        return args
    return config_from_mapping(ABAppConfig, args)


def serve_config(args: dict, ab: dict, name: str = "cobra_ab", host: str = "127.0.0.1", port: int = 8000) -> dict:
    """A Serve config (the ``serve deploy`` / ``serve run config.yaml`` format) of the A/B app.

    ``ab`` goes to the ingress's ``user_config``: redeploying the same config with another
    ``ab`` changes only that, which Serve applies with ``reconfigure`` on the running ingress
    replicas (the application's code version comes from import path + args, so the model
    slots and the ingress keep running). Deploying from Python with ``serve.run`` would not:
    imperative deployments get a fresh code version each time and restart every replica.
    """
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": "/",
                "import_path": "cobra_scale.serve.ab_app:build_ab_app",
                "args": args,
                "deployments": [{"name": "ABIngress", "user_config": {"ab": ab}}],
            }
        ],
    }


__all__ = ["ABServiceBackend", "ARM_PARAMS", "EXPLICIT_ARM", "ab_app_config", "check_arm_params", "serve_config"]
