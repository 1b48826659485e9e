"""One config system: dataclass schemas + OmegaConf YAML + ``key=value`` overrides.

Precedence, lowest first: schema defaults < ``--config`` YAML < ``--flag`` options
< positional ``key=value`` overrides. Every stage saves the resolved config next
to its outputs with :func:`save_config`, so an artifact always says how it was made.

Semantic checks live in each schema's ``__post_init__`` (raising
:class:`~cobra_scale.errors.ConfigError`); OmegaConf checks types and unknown keys.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cobra_scale.errors import ConfigError

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field whose ``help`` becomes the CLI flag's help text."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _one_line(exc: BaseException) -> str:
    # OmegaConf messages span several lines (full_key, object_type, ...); keep the first.
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_config(
    schema: type[T],
    config_path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    dotlist: list[str] | None = None,
) -> T:
    """Build a validated config object of type ``schema``.

    Args:
        schema: a dataclass whose fields (with defaults) are the config keys.
        config_path: optional YAML file merged over the defaults.
        overrides: ``{dotted.key: value}`` from CLI flags; ``None`` values are skipped.
        dotlist: ``["key=value", ...]`` overrides, applied last.

    Returns:
        an instance of ``schema`` (its ``__post_init__`` checks have run).

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type, failed check.
    """
    try:
        cfg = OmegaConf.structured(schema)
    except OmegaConfBaseException as exc:  # a schema bug, not a user error
        raise TypeError(f"invalid config schema {schema.__name__}: {exc}") from exc
    layers: list[DictConfig] = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends
            if "Invalid loaded object type" in str(exc):
                raise ConfigError(f"config {path} must be a mapping of keys to values") from exc
            raise ConfigError(f"cannot parse config {path}: {_one_line(exc)}") from exc
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        layers.append(loaded)
    if overrides:
        flat = {k: v for k, v in overrides.items() if v is not None}
        if flat:
            layers.append(OmegaConf.from_dotlist([f"{k}={_to_yaml_scalar(v)}" for k, v in flat.items()]))
    if dotlist:
        bad = [item for item in dotlist if "=" not in item or item.startswith("=")]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        try:
            layers.append(OmegaConf.from_dotlist(list(dotlist)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {_one_line(exc)}") from exc
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            where = f" (key '{key}')" if key else ""
            raise ConfigError(f"invalid config{where}: {_one_line(exc)}") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = ", ".join(f"--{k.replace('_', '-')}" if "." not in k else f"{k}=..." for k in missing)
        raise ConfigError(f"missing required config value(s): {', '.join(missing)} (set {hint})")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {_one_line(exc)}") from exc
    return obj  # type: ignore[return-value]


def config_from_mapping(schema: type[T], args: Any, what: str = "application args") -> T:
    """A validated ``schema`` object from a plain mapping (e.g. Ray Serve application ``args``).

    Raises ConfigError (one line) when ``args`` is not a mapping, lacks a required key,
    names an unknown key or has a value of the wrong type.
    """
    if not isinstance(args, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(args).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(args))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{what} lack: {', '.join(missing)}")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid {what}: {_one_line(exc)}") from exc


def _to_yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_to_yaml_scalar(v) for v in value) + "]"
    return str(value)


def to_yaml(config: Any) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, out_dir: str | os.PathLike, filename: str = CONFIG_FILENAME) -> Path:
    """Write the resolved ``config`` to ``out_dir/filename`` and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(to_yaml(config))
    return path


def cli_fields(schema: type) -> list[tuple[str, type, Any, str]]:
    """Scalar top-level fields of ``schema`` as ``(name, type, default, help)``.

    These become ``--flag`` options; nested or container fields are set with
    ``key=value`` overrides instead.
    """
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        if origin is typing.Union or str(origin) == "types.UnionType":
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        if tp not in (int, float, str, bool):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, tp, default, f.metadata.get("help", "")))
    return out
