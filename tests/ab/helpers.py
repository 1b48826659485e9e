"""Small experiment configs shared by the A/B tests."""

from __future__ import annotations

from cobra_scale.ab.configs import ABConfig
from cobra_scale.ab.router import ab_config_from_dict


def two_arm_dict(control_share: float = 0.5, holdout: float = 0.0, start: int = 0, end: int = 1000) -> dict:
    return {
        "salt": "test-salt",
        "buckets": 10_000,
        "holdout": holdout,
        "default_model": "cobra",
        "experiments": [
            {
                "name": "fusion",
                "layer": "model",
                "start": start,
                "end": end,
                "arms": [
                    {"name": "control", "share": control_share, "model": "cobra"},
                    {"name": "treatment", "share": round(1.0 - control_share, 10), "model": "cobra_no_fusion"},
                ],
            }
        ],
    }


def two_layer_config() -> ABConfig:
    d = two_arm_dict(end=10_000)
    d["experiments"].append(
        {
            "name": "tau",
            "layer": "inference",
            "start": 0,
            "end": 10_000,
            "arms": [{"name": f"tau_{i}", "share": 0.25, "params": {"tau": float(i)}} for i in range(4)],
        }
    )
    return ab_config_from_dict(d)
