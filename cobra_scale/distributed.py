"""The one small helper module for distribution: starting or joining Ray, safely.

Model math never imports this module; the training, serving and batch-inference layers do.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Ray binds 0.0.0.0 and the machine's external address unless this is 0 (it then binds
# 127.0.0.1 only). Set before Ray is imported: on our machines only loopback is allowed.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False, **kwargs: Any):
    """Start an in-process Ray bound to 127.0.0.1, or join ``address`` / ``$RAY_ADDRESS``.

    ``dashboard`` starts the in-process Ray's dashboard on 127.0.0.1: it serves the state
    API, which Ray Train's placement-group cleaner polls every few seconds (without it the
    cleaner cannot work and logs a warning each time). Returns the ``ray`` module.
    Idempotent: an already initialised Ray is reused.
    """
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        # More logical CPUs than cores: Ray Data's read tasks otherwise starve next to
        # CPU actors on a 2-core machine (see docs/operations.md).
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        log.info("starting in-process Ray on 127.0.0.1 with %d logical CPUs", cpus)
        options = {"include_dashboard": dashboard, "configure_logging": False, "log_to_driver": False, **kwargs}
        if dashboard:
            # Ray's state client, in every worker of this Ray, finds the API server through
            # RAY_API_SERVER_ADDRESS before anything else; without it, it auto-detects "the"
            # local Ray and fails (or, worse, reaches another Ray's dashboard) when several
            # run on one machine. The node processes inherit this environment.
            port = int(options.pop("dashboard_port", 0) or _free_loopback_port())
            options.update(dashboard_host="127.0.0.1", dashboard_port=port)
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", **options)
    return ray


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
