"""ABRouter: share changes through a config dict move only the intended buckets."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cobra_scale.ab.bucketing import bucket_of, moved_buckets, reshare
from cobra_scale.ab.router import ABRouter, ab_config_from_dict, ab_config_to_dict
from cobra_scale.errors import ConfigError
from tests.ab.helpers import two_arm_dict

USERS = range(30_000)


def _arms(router: ABRouter) -> np.ndarray:
    return np.array([router.route(u).arm for u in USERS], dtype=object)


def _model_buckets(cfg_dict: dict) -> np.ndarray:
    return np.array([bucket_of(str(u), cfg_dict["salt"], "model", cfg_dict["buckets"]) for u in USERS])


def test_share_change_via_config_dict_moves_only_intended_buckets():
    before = two_arm_dict(control_share=0.5)
    router = ABRouter(before, known_models=["cobra", "cobra_no_fusion"])
    old = _arms(router)
    router.reconfigure(two_arm_dict(control_share=0.4))  # what a Serve user_config update does
    new = _arms(router)
    buckets = _model_buckets(before)
    changed = old != new
    # exactly the users of buckets [400, 500) move, all from control to treatment
    assert set(buckets[changed]) <= set(range(400, 500))
    assert changed.sum() == ((buckets >= 400) & (buckets < 500)).sum() > 0
    assert set(old[changed]) == {"control"} and set(new[changed]) == {"treatment"}
    # users outside the experiment are untouched
    assert (new[buckets >= 1000] == "default").all()


def test_reshare_three_arms_moves_the_minimum():
    d = two_arm_dict()
    d["experiments"][0]["arms"] = [{"name": n, "share": s} for n, s in (("a", 0.2), ("b", 0.3), ("c", 0.5))]
    cfg = ab_config_from_dict(d)
    # a grows by 10 points, c shrinks by 10: contiguous layout would also move b's users
    new_cfg = reshare(cfg, "fusion", {"a": 0.3, "c": 0.4})
    moved = moved_buckets(cfg.experiment("fusion"), new_cfg.experiment("fusion"))
    assert moved == {("c", "a"): 100}
    assert [arm.share for arm in new_cfg.experiment("fusion").arms] == [0.3, 0.3, 0.4]
    old_r, new_r = ABRouter(cfg), ABRouter(ab_config_to_dict(new_cfg))  # explicit ranges survive a dict round trip
    o, n = _arms(old_r), _arms(new_r)
    assert set(zip(o[o != n], n[o != n])) == {("c", "a")}
    assert ((o == "b") == (n == "b")).all()  # b keeps exactly its users


def test_reshare_ramp_up_keeps_existing_users():
    cfg = ab_config_from_dict(two_arm_dict(end=1000))
    ramped = reshare(cfg, "fusion", end=5000)
    assert moved_buckets(cfg.experiment("fusion"), ramped.experiment("fusion")) == {(None, "control"): 2000, (None, "treatment"): 2000}
    o, n = _arms(ABRouter(cfg)), _arms(ABRouter(ramped))
    enrolled = o != "default"
    assert (o[enrolled] == n[enrolled]).all()


def test_reshare_errors():
    cfg = ab_config_from_dict(two_arm_dict())
    with pytest.raises(ConfigError, match="no arm"):
        reshare(cfg, "fusion", {"treatmnt": 0.5})
    with pytest.raises(ConfigError, match="sum to"):
        reshare(cfg, "fusion", {"control": 0.6})
    with pytest.raises(ConfigError, match="no experiment"):
        reshare(cfg, "fuson", {})


def test_absent_ids_and_holdout_get_the_default_model():
    router = ABRouter(two_arm_dict(holdout=0.05, end=10_000))
    for uid in (None, "", "  ", float("nan"), {"id": 1}):
        r = router.route(uid)
        assert (r.user_id, r.arm, r.experiment, r.model, r.exposures()) == (None, "default", None, "cobra", [(None, "default")])
    held = [router.route(u) for u in USERS if router.route(u).arm == "holdout"]
    assert 0.04 < len(held) / len(USERS) < 0.06
    assert all(r.model == "cobra" and r.experiment is None for r in held)


def test_bad_reconfigure_keeps_the_old_config():
    router = ABRouter(two_arm_dict(), known_models=["cobra", "cobra_no_fusion"])
    before = _arms(router)
    bad = two_arm_dict()
    bad["experiments"][0]["arms"][1]["model"] = "cobra_v9"
    with pytest.raises(ConfigError, match="unknown model version"):
        router.reconfigure(bad)
    with pytest.raises(ConfigError, match="sum to"):
        router.reconfigure(two_arm_dict(control_share=0.5) | {"experiments": [{**two_arm_dict()["experiments"][0], "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}]})
    assert (before == _arms(router)).all()


def test_routes_never_mix_two_configs_under_concurrent_reconfigure():
    """Readers see the old or the new table, never a blend (one reference read per route)."""
    configs = [ab_config_from_dict(two_arm_dict(control_share=s)) for s in (0.5, 0.3)]
    expected = [dict(zip(range(2000), (ABRouter(c).route(u).arm for u in range(2000)))) for c in configs]
    router = ABRouter(configs[0])
    stop = threading.Event()
    bad, flips = [], []

    def flip():
        i = 0
        while not stop.is_set():
            i ^= 1
            router.reconfigure(configs[i])
            flips.append(i)
            time.sleep(0.0005)

    def read():
        # Keep reading until the flipper has swapped the table many times (or a
        # deadline passes), so the check does not depend on thread scheduling.
        deadline = time.monotonic() + 10.0
        while len(flips) < 50 and time.monotonic() < deadline:
            for u in range(2000):
                arm = router.route(u).arm
                if arm not in (expected[0][u], expected[1][u]):
                    bad.append(u)

    t = threading.Thread(target=flip)
    t.start()
    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    stop.set()
    t.join()
    assert not bad and len(flips) > 2
