"""``cobra serve``: the local default — in-process Ray on 127.0.0.1, Serve HTTP on loopback.

The app is deployed *declaratively*, exactly as ``serve run cluster/serve_config.yaml``
does (a Serve config: import path + args + per-deployment options), so a later deploy
that changes only the recommender's ``user_config`` reconfigures live replicas instead of
restarting them (:func:`deploy`). With ``$RAY_ADDRESS`` set it deploys to that cluster
(``--detach`` leaves the app running there). Stops cleanly on Ctrl-C / SIGTERM /
``--duration-s``: deletes the app it deployed and shuts down only the Ray it started.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cobra_scale.errors import CobraError, ConfigError
from cobra_scale.serve.configs import LOOPBACK_HOSTS, AppConfig, ServeConfig, app_fields

log = logging.getLogger(__name__)

BUILDER = "cobra_scale.serve.app:build_app"
# Read by Ray's processes at start (the in-process cluster inherits the driver's environment).
# Serve gives its HTTP proxy 5 s to come up; on a loaded small machine its imports alone take
# longer, and Serve then kills and restarts it forever.
SLOW_MACHINE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def serve_config(cfg: ServeConfig) -> dict:
    """The Serve config (``serve run`` / ``serve deploy`` format) of a ``cobra serve`` config.

    Paths become absolute (replicas need not share this working directory); the
    recommender's ``user_config`` goes to ``deployments``, where changing it is a live
    reconfiguration rather than a redeploy.
    """
    from omegaconf import OmegaConf

    args = OmegaConf.to_container(OmegaConf.structured(AppConfig(**app_fields(cfg))))
    args["run"] = str(Path(cfg.run).expanduser().resolve())
    if cfg.history_table:
        args["history_table"] = str(Path(cfg.history_table).expanduser().resolve())
    user_config = args.pop("user_config") or {}
    app: dict = {"name": cfg.app_name, "route_prefix": "/", "import_path": BUILDER, "args": args}
    app["deployments"] = [{"name": "Recommender", "user_config": dict(user_config)}]
    return {"proxy_location": "HeadOnly", "http_options": {"host": cfg.host, "port": cfg.port}, "applications": [app]}


def deploy(cfg: ServeConfig, timeout_s: float | None = None) -> None:
    """Submit the app (or a new version of it) and wait until Serve reports it RUNNING."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config(cfg))
    _get_global_client().deploy_apps(schema, _blocking=False)  # what `serve run config.yaml` calls
    wait_running(cfg.app_name, cfg.ready_timeout_s if timeout_s is None else timeout_s)


def wait_running(app_name: str, timeout_s: float) -> None:
    """Poll ``serve.status()`` until the app is RUNNING; a failed deploy raises its message."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)  # let the controller register the new target first
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            message = (app.message or "").strip()
            user_error = next((line for line in message.splitlines() if "Error: " in line), message.splitlines()[-1] if message else "")
            raise CobraError(f"deploying {app_name} failed: {user_error.strip()[:500]}")
        time.sleep(0.5)
    raise CobraError(f"{app_name} was not running after {timeout_s:.0f}s (status {status})")


def wait_ready(url: str, timeout_s: float) -> dict:
    """Poll ``url/readyz`` until it answers 200; return its body."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise CobraError(f"the service at {url} was not ready after {timeout_s:.0f}s (last: {last})")


def _check(cfg: ServeConfig) -> None:
    """One-line errors before anything starts."""
    run = Path(cfg.run)
    if not (run / "config.yaml").is_file() or not (run / "best" / "model.safetensors").is_file():
        raise ConfigError(f"{cfg.run} is not a trained run folder (needs config.yaml and best/model.safetensors; train with `cobra train`)")
    if cfg.history_table and not Path(cfg.history_table).exists():
        raise ConfigError(f"history_table {cfg.history_table} not found")
    from pydantic import ValidationError

    from cobra_scale.serve.app import base_settings
    from cobra_scale.serve.engine import Settings
    from cobra_scale.serve.schemas import first_error_line

    try:
        settings = Settings(**{**base_settings(cfg, run.resolve()), **cfg.user_config})
    except ValidationError as exc:
        raise ConfigError(f"invalid recommender settings / user_config: {first_error_line(exc.errors())}") from exc
    if settings.free_query_weight > 0 or settings.free_mix_weight > 0:
        from cobra_scale.config import load_config
        from cobra_scale.train.configs import TrainConfig, check_free_query_head

        check_free_query_head(load_config(TrainConfig, run / "config.yaml").model, cfg.run,
                              free_query_weight=settings.free_query_weight, free_mix_weight=settings.free_mix_weight)
    if cfg.host not in LOOPBACK_HOSTS:
        log.warning("binding HTTP to %s: the service is reachable from other machines (no authentication)", cfg.host)


@contextmanager
def local_service(cfg: ServeConfig) -> Iterator[str]:
    """Start Ray (unless joining $RAY_ADDRESS) + Serve + the app; yield the base URL; tear down what was started."""
    import ray

    from cobra_scale.distributed import init_ray

    _check(cfg)
    remote = bool(os.environ.get("RAY_ADDRESS"))
    own_ray = not ray.is_initialized() and not remote
    temp_dir = None
    try:
        if own_ray:
            for key, value in SLOW_MACHINE_ENV.items():
                os.environ.setdefault(key, value)
            temp_dir = cfg.ray_temp_dir or tempfile.mkdtemp(prefix="cobra_serve_")
            # enough logical CPUs for every replica's reservation (+1 for Serve's own actors)
            need = cfg.replicas * cfg.recommender_cpus + cfg.shards * cfg.shard_replicas * cfg.shard_cpus + cfg.ingress_cpus + 1
            # _temp_dir also keeps ray.init from joining a cluster someone started with `ray start`
            init_ray(num_cpus=max(4, int(need + 0.999), 2 * (os.cpu_count() or 1)), _temp_dir=temp_dir)
        else:
            init_ray()
        from ray import serve

        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
        except TimeoutError:
            # Serve waits a fixed 60 s for its HTTP proxy; on a busy machine the proxy is
            # still starting. Connect to the controller that now exists; /readyz waits below.
            log.warning("Serve's HTTP proxy is slow to start; waiting up to %.0fs for it", cfg.ready_timeout_s)
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
        deploy(cfg)
        url = f"http://{'[' + cfg.host + ']' if ':' in cfg.host else cfg.host}:{cfg.port}"
        wait_ready(url, cfg.ready_timeout_s)
        yield url
    finally:
        if own_ray:
            try:
                if ray.is_initialized():
                    from ray import serve

                    serve.shutdown()
            finally:
                ray.shutdown()
                if temp_dir and not cfg.ray_temp_dir:
                    _remove_soon(Path(temp_dir))
        elif not cfg.detach and ray.is_initialized():
            from ray import serve

            serve.delete(cfg.app_name)


def _remove_soon(folder: Path, within_s: float = 10.0) -> None:
    """Remove Ray's temp dir; its last processes may still write logs for a moment after shutdown."""
    deadline = time.monotonic() + within_s
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def run(cfg: ServeConfig) -> dict:
    if cfg.detach and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("--detach needs a cluster ($RAY_ADDRESS); the in-process Ray ends with this command")
    started = time.perf_counter()

    def on_term(signum, frame):  # SIGTERM stops like Ctrl-C: the finally blocks tear down
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with local_service(cfg) as url:
            # installed once Ray runs: ray.init puts its own SIGTERM handler in (it exits at once)
            signal.signal(signal.SIGTERM, on_term)
            models = json.loads(urllib.request.urlopen(f"{url}/models", timeout=30).read())
            version = models["models"][models["default"]].get("version")
            print(f"serving {cfg.run} ({version}) at {url}: POST /recommend, GET /readyz /models /docs", flush=True)
            if cfg.detach:
                return {"url": url, "app": cfg.app_name, "detached": True}
            try:
                deadline = time.monotonic() + cfg.duration_s if cfg.duration_s else float("inf")
                while time.monotonic() < deadline:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {"url": url, "served_s": round(time.perf_counter() - started, 1)}


__all__ = ["deploy", "local_service", "run", "serve_config", "wait_ready", "wait_running"]
