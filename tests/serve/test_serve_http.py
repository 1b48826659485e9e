"""The Serve application over HTTP on 127.0.0.1: smoke, fan-out, reconfigure, fuzz, loopback binding.

One in-process Ray + Serve for the module (Ingress -> Recommender -> 2 index shards).
"""

import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest

from cobra_scale.config import load_config
from cobra_scale.serve.configs import ServeConfig
from cobra_scale.serve.engine import ModelEngine, Settings
from cobra_scale.serve.fuzz import malformed_requests
from tests.serve.conftest import train_tiny

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json", **(headers or {})}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_for(condition, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def serve_config(run, port, data, **extra):
    dotlist = [f"run={run}", f"port={port}", "shards=2", "replicas=1", "max_batch_size=8", "batch_wait_timeout_s=0.01",
               "inference.beams=8", "recommender_cpus=0.5", f"history_table={data / 'splits' / 'loo' / 'test'}", "ready_timeout_s=600"]
    return load_config(ServeConfig, dotlist=dotlist + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def service(tiny_run, tiny_data):
    from cobra_scale.serve.run_serve import local_service

    cfg = serve_config(tiny_run, free_port(), tiny_data)
    with local_service(cfg) as url:
        yield url, cfg


def test_recommend_over_http(service, tiny_run):
    url, _ = service
    status, body = call(url, "/recommend", {"items": [3, 4, 5], "k": 5})
    assert status == 200, body
    assert 0 < len(body["items"]) <= 5 and all(1 <= i["item_id"] <= 40 and len(i["sid"]) == 2 for i in body["items"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"] == "default" and body["model_version"].startswith("run@") and body["mode"] == "cobra"
    # the answer through ingress -> recommender -> 2 shard deployments is the in-process model's
    engine = ModelEngine(tiny_run, "cpu")
    want = engine.run_batch([engine.prepare({"items": [3, 4, 5], "k": 5}, Settings(run=str(tiny_run), beams=8))])[0]
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in want["items"]]
    status, body = call(url, "/recommend", {"user_id": 7, "k": 3, "mode": "no_fusion"})
    assert status == 200 and body["mode"] == "no_fusion" and len(body["items"]) == 3


def test_health_readiness_openapi(service):
    url, _ = service
    assert call(url, "/healthz") == (200, {"status": "ok"})
    status, ready = call(url, "/readyz")
    assert status == 200 and ready["ready"] and ready["models"]["default"]["shards"] == 2
    status, schema = call(url, "/openapi.json")
    assert status == 200 and "/recommend" in schema["paths"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"items": [3, 999]}, 422, "unknown item"),
        ({"items": list(range(1, 25))}, 422, "items"),  # window of the tiny model: 20
        ({"items": [3], "k": 0}, 422, "k"),
        ({"items": [3], "k": "5"}, 422, "k"),
        ({"items": [3], "mode": "sparse_only"}, 422, "not available"),
        ({"user_id": 10_000}, 404, "user"),
        ({"items": [3], "model": "b"}, 404, "model"),
    ],
)
def test_bad_input_is_4xx_with_a_message(service, body, status, words):
    got, answer = call(service[0], "/recommend", body)
    assert got == status and words in answer["detail"], answer


def test_fuzzed_requests_get_only_4xx(service):
    url, _ = service
    _, openapi = call(url, "/openapi.json")
    cases = malformed_requests(openapi, valid={"items": [3, 4], "k": 5}, seed=7, unknown_items=[999, 1000])
    answers = {}
    for _ in range(60):
        label, body, headers = next(cases)
        status, answer = call(url, "/recommend", body, headers)
        answers[label] = status
        assert 400 <= status < 500, (label, body[:200], status, answer)
    assert len(answers) > 20


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (Ray's gRPC servers)
    return (mapped or address).is_loopback


def listening_addresses(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_binds_loopback_only(service):
    url, cfg = service
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}  # raylet, GCS, Serve controller, proxy, replicas
    listening = listening_addresses(pids)
    assert any(ip == "127.0.0.1" and port == cfg.port for _, ip, port in listening)  # the HTTP proxy
    exposed = [(pid, ip, port) for pid, ip, port in listening if not is_loopback(ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_user_config_reconfigures_without_restart_and_swaps_the_model(service, tiny_run, tiny_data, tmp_path_factory):
    from cobra_scale.serve.run_serve import deploy

    url, cfg = service
    body = {"items": [3, 4, 5], "k": 8}
    _, before = call(url, "/recommend", body)
    _, info = call(url, "/models")
    pid = info["models"]["default"]["pid"]
    batching = info["models"]["default"]["batching"]  # the replica's own count of its batches (load_test reads it)
    assert batching["batches"] >= 1 and batching["requests"] >= batching["batches"] and batching["seconds"] > 0

    def redeploy(user_config):  # the same app, a new user_config: what `serve deploy` of an edited YAML does
        new = serve_config(tiny_run, cfg.port, tiny_data)
        new.user_config = user_config
        deploy(new)

    redeploy({"beams": 1, "tau": 0.5})
    wait_for(lambda: call(url, "/models")[1]["models"]["default"]["settings"]["beams"] == 1)
    status, after = call(url, "/recommend", body)
    assert status == 200 and after["beams"] == 1 and after["tau"] == 0.5
    assert len(after["items"]) < len(before["items"]) or after["items"] != before["items"]  # one beam: one ID's items only
    _, info = call(url, "/models")
    assert info["models"]["default"]["pid"] == pid  # reconfigured in place, not restarted

    # swap the model version through user_config: another run, same replica
    other = train_tiny(tiny_data, tmp_path_factory.mktemp("serve_run_b") / "run_b", "epochs=1", "seed=3")
    redeploy({"run": str(other), "version": "b-1"})
    wait_for(lambda: call(url, "/models")[1]["models"]["default"].get("version") == "b-1")
    status, swapped = call(url, "/recommend", body)
    assert status == 200 and swapped["model_version"] == "b-1"
    engine = ModelEngine(other, "cpu")
    want = engine.run_batch([engine.prepare(body, Settings(run=str(other), beams=8))])[0]
    assert [i["item_id"] for i in swapped["items"]] == [i["item_id"] for i in want["items"]]
    _, info = call(url, "/models")
    assert info["models"]["default"]["pid"] == pid and info["models"]["default"]["run"] == str(other)
