"""The config system: defaults < YAML < flags < key=value, typed validation, saved configs."""

import pytest
from omegaconf import OmegaConf

from cobra_scale.config import cli_fields, load_config, save_config
from cobra_scale.data.configs import SessionizeConfig, SplitConfig, SynthConfig
from cobra_scale.errors import ConfigError


def test_precedence_defaults_yaml_flags_dotlist(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("out: /tmp/a\nusers: 5\nitems: 100\ndays: 3\n")
    cfg = load_config(SynthConfig, yaml, overrides={"items": 200, "days": None}, dotlist=["items=300"])
    assert cfg.out == "/tmp/a"
    assert cfg.users == 5  # from YAML
    assert cfg.days == 3  # flag left unset (None) does not override YAML
    assert cfg.items == 300  # dotlist wins over flag
    assert cfg.seed == 0  # schema default


def test_list_override():
    cfg = load_config(SessionizeConfig, dotlist=["events=e", "out=o", "event_types=[click,conversion]"])
    assert cfg.event_types == ["click", "conversion"]


@pytest.mark.parametrize(
    "dotlist, match",
    [
        (["out=x", "users=abc"], "users"),
        (["out=x", "nope=1"], "nope"),
        (["users=3"], "missing required config value.*out"),
        (["out=x", "users=0"], "users must be > 0"),
        (["out=x", "p_drift=1.5"], "p_drift"),
        (["out=x", "start_date=yesterday"], "start_date"),
        (["out=x", "users"], "key=value"),
    ],
)
def test_bad_values_are_one_line_config_errors(dotlist, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(SynthConfig, dotlist=dotlist)
    assert "\n" not in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config"):
        load_config(SynthConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(SynthConfig, tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SynthConfig, scalar)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(SplitConfig, dotlist=["sequences=s", "out=o", "kind=time", "test_day=2026-01-07"])
    path = save_config(cfg, tmp_path)
    again = load_config(SplitConfig, path)
    assert again == cfg
    assert OmegaConf.load(path).kind == "time"


def test_cli_fields_are_scalars_with_help():
    fields = {name: (tp, default, help_) for name, tp, default, help_ in cli_fields(SessionizeConfig)}
    assert "event_types" not in fields  # a list: set with key=value
    assert fields["strict"][0] is bool
    assert all(h for _, _, h in fields.values())


def test_shipped_configs_validate():
    from pathlib import Path

    from cobra_scale.cli import COMMANDS, _load

    root = Path(__file__).resolve().parents[1] / "configs" / "data"
    schemas = {name: _load(cmd.schema) for name, cmd in COMMANDS["data"].items()}
    found = sorted(root.glob("*.yaml"))
    assert found, "configs/data/*.yaml should exist"
    for path in found:
        schema = schemas[path.stem.split("_")[0]]
        load_config(schema, path)


def test_negative_time_budget_is_refused():
    from cobra_scale.train.configs import TrainConfig

    with pytest.raises(ConfigError, match="max_minutes must be >= 0"):
        load_config(TrainConfig, dotlist=["data=d", "ids=i", "out=o", "max_minutes=-5"])
