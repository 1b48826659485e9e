"""A Ray head for tests: 127.0.0.1 only, its own temp dir and free ports, stopped by PID.

Fixed ports (the metrics agent's included) spare the raylet from waiting for its agents
to report theirs, which times out on a loaded machine. Other Ray clusters on the machine
are left alone: only processes whose command line names this head's temp dir (and their
children) are stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Head:
    temp_dir: str
    env: dict  # environment for clients of this head (loopback, no auth token)
    gcs_address: str  # 127.0.0.1:<port>, for ray.init / RAY_ADDRESS
    dashboard_url: str  # http://127.0.0.1:<port>, for `ray job submit`


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_head(cwd: Path, num_cpus: int = 4, dashboard: bool = True) -> Head:
    """Start the head (``dashboard=False`` when no job API is needed: one process less to wait for)."""
    temp_dir = tempfile.mkdtemp(prefix="cobra-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard_port, client, agent_listen, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--port={gcs}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--include-dashboard={str(dashboard).lower()}",
    ]
    try:
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=400)
    except BaseException:
        stop_head(temp_dir, f"127.0.0.1:{gcs}")
        raise
    if done.returncode != 0:
        stop_head(temp_dir, f"127.0.0.1:{gcs}")
        raise RuntimeError(f"ray start failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return Head(temp_dir, env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard_port}")


def head_processes(temp_dir: str, gcs_address: str | None = None) -> list[psutil.Process]:
    """This head's processes: those naming its temp dir, or its GCS address (the Ray client
    server names only ``--address=<gcs>``), and their children."""
    marks = [temp_dir] + ([f"--address={gcs_address}"] if gcs_address else [])
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in part for part in proc.info["cmdline"] or [] for mark in marks):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_head(temp_dir: str, gcs_address: str | None = None) -> None:
    # rounds: a process the head spawned while the previous round was stopping it (a GCS server
    # outlived one round on a loaded machine) is found and stopped by the next
    for _ in range(3):
        procs = head_processes(temp_dir, gcs_address)
        if not procs:
            break
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)
