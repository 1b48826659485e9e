"""The A/B ingress logic over fake model slots (FastAPI TestClient, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cobra_scale.ab.exposure import ExposureLogger
from cobra_scale.ab.router import ABRouter
from cobra_scale.ab.serving import ABServiceBackend
from cobra_scale.data.io import read_table
from cobra_scale.errors import ConfigError
from cobra_scale.serve.api import build_api
from cobra_scale.serve.schemas import Limits
from cobra_scale.serve.service import HistoryTable
from tests.ab.helpers import two_arm_dict

LIMITS = Limits(max_k=20, max_history=8, max_beams=16, max_body_bytes=4096)
USERS = np.arange(120)


class FakeSlot:
    """A model slot that answers with items named after itself and echoes tau/mode."""

    def __init__(self, offset: int):
        self.offset, self.payloads = offset, []

    async def recommend(self, payload: dict) -> dict:
        self.payloads.append(payload)
        k = payload.get("k", 10)
        items = [{"item_id": self.offset + j, "score": 1.0 / (j + 1), "sid": [0, j]} for j in range(k)]
        return {"items": items, "model_version": f"fake{self.offset}", "mode": payload.get("mode", "cobra"), "k": k, "beams": 4,
                "tau": payload.get("tau", 1.0), "psi": 20.0, "history_length": len(payload["items"])}

    async def info(self) -> dict:
        return {"version": f"fake{self.offset}"}


def _config(control_share=0.5):
    d = two_arm_dict(control_share=control_share, end=10_000, holdout=0.1)
    d["experiments"][0]["arms"][1]["params"] = {"tau": 2.5}
    return d


@pytest.fixture
def setup(tmp_path):
    slots = {"cobra": FakeSlot(1000), "cobra_no_fusion": FakeSlot(2000)}
    histories = HistoryTable(user_ids=USERS, offsets=np.arange(len(USERS) + 1) * 2, items=np.repeat(USERS + 1, 2))
    logger = ExposureLogger(tmp_path / "exposures", flush_interval_s=0.05)
    backend = ABServiceBackend(slots, "cobra", LIMITS, _config(), logger, histories)
    with TestClient(build_api(backend, LIMITS)) as client:  # one event loop for all requests
        yield client, backend, slots, tmp_path / "exposures"
    backend.close()


def test_requests_follow_the_router_and_name_the_arm(setup):
    client, backend, slots, folder = setup
    router = ABRouter(_config())
    seen = set()
    for u in USERS:
        r = client.post("/recommend", json={"user_id": int(u), "k": 3})
        assert r.status_code == 200, r.text
        body, route = r.json(), router.route(int(u))
        assert (body["arm"], body["experiment"], body["model"]) == (route.arm, route.experiment, route.model)
        assert body["items"][0]["item_id"] == (2000 if route.model == "cobra_no_fusion" else 1000)
        assert body["tau"] == (2.5 if route.arm == "treatment" else 1.0)  # the arm's params reach the model
        seen.add(route.arm)
    assert seen == {"control", "treatment", "holdout"}
    backend.close()
    log = read_table(folder).to_pandas()
    in_exp = log[log["experiment"].notna()]
    assert len(log) == len(USERS)  # one row per request (one experiment layer)
    assert set(in_exp["arm"]) == {"control", "treatment"}
    row = in_exp.iloc[0]
    assert list(row["items"]) == [(2000 if row["arm"] == "treatment" else 1000) + j for j in range(3)]


def test_items_only_and_explicit_model_requests(setup):
    client, backend, slots, folder = setup
    body = client.post("/recommend", json={"items": [1, 2]}).json()
    assert (body["arm"], body["experiment"], body["model"]) == ("default", None, "cobra")
    body = client.post("/recommend", json={"user_id": 3, "model": "cobra_no_fusion", "tau": 0.7}).json()
    assert (body["arm"], body["experiment"], body["model"], body["tau"]) == ("explicit", None, "cobra_no_fusion", 0.7)
    assert client.post("/recommend", json={"user_id": 5000}).status_code == 404  # no history: refused, not logged
    backend.close()
    assert sorted(read_table(folder).column("arm").to_pylist()) == ["default", "explicit"]


def test_reconfigure_moves_only_the_changed_share(setup):
    client, backend, slots, folder = setup
    users = [int(u) for u in USERS[:60]]
    before = {u: client.post("/recommend", json={"user_id": u}).json()["arm"] for u in users}
    backend.reconfigure(_config(control_share=0.3))
    after = {u: client.post("/recommend", json={"user_id": u}).json()["arm"] for u in users}
    moved = {(before[u], after[u]) for u in users if before[u] != after[u]}
    assert moved == {("control", "treatment")}
    bad = _config()
    bad["experiments"][0]["arms"][0]["model"] = "cobra_v2"
    with pytest.raises(ConfigError, match="unknown model version"):
        backend.reconfigure(bad)
    bad = _config()
    bad["experiments"][0]["arms"][0]["params"] = {"temperature": 3}
    with pytest.raises(ConfigError, match="not request settings"):
        backend.reconfigure(bad)
    bad["experiments"][0]["arms"][0]["params"] = {"tau": -1.0}
    with pytest.raises(ConfigError, match="tau"):
        backend.reconfigure(bad)
    assert client.get("/models").json()["ab"]["experiments"]["fusion"]["arms"]["control"]["share"] == pytest.approx(0.3)
    backend.close()
