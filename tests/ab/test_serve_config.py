"""The A/B Serve config: cluster/serve_ab.yaml and serve_config() are valid Serve configs whose args and user_config validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_serve_ab_yaml_is_valid():
    from ray.serve.schema import ServeDeploySchema

    from cobra_scale.ab.router import ab_config_from_dict
    from cobra_scale.ab.serving import ab_app_config

    raw = yaml.safe_load((ROOT / "cluster" / "serve_ab.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    assert app["import_path"] == "cobra_scale.serve.ab_app:build_ab_app"
    assert raw["http_options"]["host"] == "127.0.0.1"
    cfg = ab_app_config(app["args"])
    ab = ab_config_from_dict(app["deployments"][0]["user_config"]["ab"])
    assert set(ab.models()) <= set(cfg.models)
    assert (ROOT / cfg.experiments).is_file()


def test_serve_config_round_trip():
    from ray.serve.schema import ServeDeploySchema

    from cobra_scale.ab.router import ab_config_to_dict, load_ab_config
    from cobra_scale.errors import ConfigError
    from cobra_scale.ab.serving import ab_app_config, serve_config

    ab = ab_config_to_dict(load_ab_config(str(ROOT / "configs" / "ab" / "demo.yaml")))
    args = {"run": "r", "experiments": "configs/ab/demo.yaml", "models": {"cobra": {}, "cobra_no_fusion": {"mode": "no_fusion"}}}
    schema = ServeDeploySchema.model_validate(serve_config(args, ab, port=8123))
    assert schema.applications[0].deployments[0].user_config == {"ab": ab}
    with pytest.raises(ConfigError, match="default_slot"):
        ab_app_config({**args, "default_slot": "nope"})
    with pytest.raises(ConfigError, match="missing|lack"):
        ab_app_config({"run": "r"})
