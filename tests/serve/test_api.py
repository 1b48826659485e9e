"""The HTTP contract without Ray: validation, limits, error shapes, OpenAPI, fuzzing (FastAPI TestClient)."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cobra_scale.serve.api import ApiError, build_api
from cobra_scale.serve.fuzz import malformed_requests, request_schema
from cobra_scale.serve.schemas import Limits, request_model
from cobra_scale.serve.service import HistoryTable, ServiceBackend

LIMITS = Limits(max_k=50, max_history=8, max_beams=16, max_body_bytes=4096)
CATALOGUE = set(range(1, 41))


class FakeModel:
    """Answers like a recommender slot: refuses unknown items (422), echoes the parameters."""

    def __init__(self):
        self.payloads = []

    async def recommend(self, payload: dict) -> dict:
        self.payloads.append(payload)
        unknown = [i for i in payload["items"] if i not in CATALOGUE]
        if unknown:
            return {"error": {"status": 422, "detail": f"items: unknown item id(s) {unknown}"}}
        k = payload.get("k", 10)
        items = [{"item_id": (payload["items"][-1] + j) % 40 + 1, "score": 1.0 / (j + 1), "sid": [j % 4, 0]} for j in range(k)]
        return {"items": items, "model_version": "fake@0", "mode": payload.get("mode", "cobra"), "k": k, "beams": payload.get("beams", 4),
                "tau": payload.get("tau", 1.0), "psi": payload.get("psi", 20.0), "history_length": len(payload["items"])}

    async def info(self) -> dict:
        return {"version": "fake@0"}


class DeadModel:
    async def recommend(self, payload):
        raise ApiError(503, "model replicas unavailable; retry")

    async def info(self):
        raise RuntimeError("replica is loading")


@pytest.fixture()
def model():
    return FakeModel()


@pytest.fixture()
def client(model):
    histories = HistoryTable(user_ids=np.array([5, 9]), offsets=np.array([0, 3, 13]), items=np.array([1, 2, 3, *range(10, 20)]))
    backend = ServiceBackend({"default": model, "b": FakeModel()}, "default", LIMITS, histories)
    return TestClient(build_api(backend, LIMITS))


def test_valid_request_answers_with_items_sids_and_version(client, model):
    r = client.post("/recommend", json={"items": [3, 4, 5], "k": 3, "tau": 2, "beams": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["item_id"] for i in body["items"]] == [6, 7, 8] and body["items"][0]["sid"] == [0, 0]
    assert body["model"] == "default" and body["model_version"] == "fake@0" and body["tau"] == 2.0
    assert model.payloads[-1] == {"items": [3, 4, 5], "k": 3, "tau": 2.0, "beams": 4}  # None fields are not sent


@pytest.mark.parametrize(
    "body, where",
    [
        ({"items": [1], "k": 0}, "k"),
        ({"items": [1], "k": 51}, "k"),  # above max_k
        ({"items": [1], "k": "5"}, "k"),  # strings are not integers
        ({"items": [1], "k": 5.0}, "k"),
        ({"items": [1], "k": True}, "k"),
        ({"items": list(range(1, 10))}, "items"),  # 9 > max_history
        ({"items": []}, "items"),
        ({"items": [1, "2"]}, "items"),
        ({"items": [2**63]}, "items"),  # beyond int64
        ({"items": [1], "beams": 17}, "beams"),
        ({"items": [1], "tau": 0}, "tau"),
        ({"items": [1], "psi": -1.0}, "psi"),
        ({"items": [1], "mode": "greedy"}, "mode"),
        ({"items": [1], "model": "../x"}, "model"),
        ({"items": [1], "extra": 1}, "extra"),
        ({"k": 3}, "exactly one of"),
        ({"items": [1], "user_id": 5}, "exactly one of"),
    ],
)
def test_bad_requests_are_422_with_a_one_line_message(client, body, where):
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert where in detail and "\n" not in detail


def test_nan_and_bad_json_are_422(client):
    for raw in (b'{"items": [1], "tau": NaN}', b'{"items": [1], "psi": Infinity}', b'{"items": [1', b"not json"):
        r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)


def test_unknown_items_user_and_model_are_4xx(client):
    r = client.post("/recommend", json={"items": [1, 999]})
    assert r.status_code == 422 and "999" in r.json()["detail"]
    r = client.post("/recommend", json={"user_id": 77})
    assert r.status_code == 404 and "user" in r.json()["detail"]
    r = client.post("/recommend", json={"items": [1], "model": "c"})
    assert r.status_code == 404 and "default" in r.json()["detail"]


def test_user_history_is_looked_up_and_cut_to_the_limit(client, model):
    assert client.post("/recommend", json={"user_id": 5, "k": 2}).status_code == 200
    assert model.payloads[-1]["items"] == [1, 2, 3]
    assert client.post("/recommend", json={"user_id": 9}).status_code == 200
    assert model.payloads[-1]["items"] == list(range(12, 20)) and model.payloads[-1]["truncate"] is True  # last 8 of 10


def test_body_limit_is_413(client):
    r = client.post("/recommend", content=b'{"items": [' + b"1," * 3000 + b"1]}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["detail"]


def test_health_ready_models_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/models").json()["default"] == "default"
    schema = request_schema(client.get("/openapi.json").json())
    props = schema["properties"]
    assert props["k"]["maximum"] == 50 and schema["additionalProperties"] is False
    items = props["items"]["anyOf"][0]
    assert items["maxItems"] == 8 and items["minItems"] == 1


def test_not_ready_is_503_and_dead_model_is_503():
    backend = ServiceBackend({"default": DeadModel()}, "default", LIMITS)
    client = TestClient(build_api(backend, LIMITS))
    r = client.get("/readyz")
    assert r.status_code == 503 and "loading" in r.json()["models"]["default"]["error"]
    assert client.post("/recommend", json={"items": [1]}).status_code == 503
    assert client.post("/recommend", json={"user_id": 1}).status_code == 422  # no history table on this server


def test_schema_driven_fuzz_yields_only_4xx(client):
    openapi = client.get("/openapi.json").json()
    cases = malformed_requests(openapi, valid={"items": [3, 4], "k": 5}, seed=1, max_body_bytes=LIMITS.max_body_bytes, unknown_items=[999])
    seen = {}
    for _ in range(150):
        label, body, headers = next(cases)
        r = client.post("/recommend", content=body, headers=headers)
        seen[label] = r.status_code
        assert 400 <= r.status_code < 500, (label, body[:200], r.status_code, r.text[:300])
    assert len(seen) > 40  # the stream covers many distinct breakages


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
FIELDS = st.sampled_from(["items", "user_id", "k", "mode", "beams", "tau", "psi", "exclude_history", "model", "other"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(JSON_VALUES, st.dictionaries(FIELDS, JSON_VALUES, max_size=6)))
def test_arbitrary_json_never_5xx(client, body):
    r = client.post("/recommend", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])


def test_request_model_limits_follow_config():
    model = request_model(Limits(max_k=3, max_history=2))
    assert model(items=[1, 2], k=3).k == 3
    with pytest.raises(ValueError):
        model(items=[1, 2, 3])
    with pytest.raises(ValueError):
        Limits(max_k=0)
