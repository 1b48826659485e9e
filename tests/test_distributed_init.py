"""``init_ray(dashboard=True)``: the in-process Ray serves its own state API on 127.0.0.1.

Ray Train's placement-group cleaner polls the state API to see whether the run's controller
is alive. Without a dashboard the state client falls back to http://127.0.0.1:8265, which
can be *another* Ray's dashboard on the same machine: that one does not know the
controller, and the cleaner then removes the live run's placement group (seen here in
session 8: a Beauty training killed at step 20 by a second Ray started beside it). The
training launcher starts its Ray with the dashboard for this reason.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # starts two Rays (~40 s)

CHILD = r"""
import json
from cobra_scale.distributed import init_ray
ray = init_ray(num_cpus=1, dashboard=True)
import ray._private.worker as worker
@ray.remote(num_cpus=0)
class Probe:
    def actors(self):  # from inside a Ray worker, with no address: how the cleaner resolves the state API
        from ray.util.state import list_actors
        return [a.class_name for a in list_actors(timeout=30)]
print(json.dumps({"webui": worker.global_worker.node.address_info.get("webui_url"), "actors": ray.get(Probe.remote().actors.remote())}))
"""


DECOY = r"""
import sys, time
from cobra_scale.distributed import init_ray
init_ray(num_cpus=1, dashboard=True)
print("up", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_dashboard_serves_this_rays_state_api_on_loopback_beside_another_ray():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    decoy = subprocess.Popen([sys.executable, "-c", DECOY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert decoy.stdout.readline().strip() == "up"  # a second Ray with its own dashboard runs on this machine
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    finally:
        decoy.stdin.close()
        decoy.wait(timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["webui"].startswith("127.0.0.1:")
    assert result["actors"].count("Probe") == 1  # this Ray's actors, not the other's
