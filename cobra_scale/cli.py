"""The ``cobra`` console script: one subcommand per stage.

    cobra data synth --users 100000 --out data/synth
    cobra data sessionize --events data/synth/events --out data/synth/sequences
    cobra data split --sequences data/synth/sequences --out data/synth/splits/time kind=time
    cobra data amazon --src ../shared/datasets/amazon-beauty --out data/beauty

Every command takes ``--config FILE.yaml``, ``--flag value`` options generated from its
config schema, and trailing ``key=value`` overrides. Heavy libraries (ray, deepspeed,
torch) are imported only by the command that runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cobra_scale.config import cli_fields, load_config
from cobra_scale.errors import CobraError


@dataclass(frozen=True)
class Command:
    """A CLI command: its config schema and the function that runs it (both lazy)."""

    schema: str  # "module:Class"
    runner: str  # "module:function", called with the config object, returns a summary dict


# group -> name -> Command. Group None means a top-level command (``cobra ids``).
COMMANDS: dict[str | None, dict[str, Command]] = {
    "data": {
        "synth": Command("cobra_scale.data.configs:SynthConfig", "cobra_scale.data.synth:run"),
        "amazon": Command("cobra_scale.data.configs:AmazonConfig", "cobra_scale.data.amazon:run"),
        "sessionize": Command("cobra_scale.data.configs:SessionizeConfig", "cobra_scale.data.sessionize:run"),
        "split": Command("cobra_scale.data.configs:SplitConfig", "cobra_scale.data.split:run"),
        "validate": Command("cobra_scale.data.configs:ValidateConfig", "cobra_scale.data.validate:run"),
    },
    "baseline": {
        "sasrec": Command("cobra_scale.baselines.configs:SASRecConfig", "cobra_scale.baselines.sasrec:run"),
    },
    "ab": {
        "assign": Command("cobra_scale.ab.configs:AssignConfig", "cobra_scale.ab.assign:run"),
        "reshare": Command("cobra_scale.ab.configs:ReshareConfig", "cobra_scale.ab.assign:run_reshare"),
        "outcomes": Command("cobra_scale.ab.configs:OutcomesConfig", "cobra_scale.ab.outcomes:run"),
        "analyze": Command("cobra_scale.ab.configs:AnalyzeConfig", "cobra_scale.ab.analyze:run"),
    },
    None: {
        "ids": Command("cobra_scale.semantic_ids.configs:IdsConfig", "cobra_scale.semantic_ids.assign:run"),
        "train": Command("cobra_scale.train.configs:TrainConfig", "cobra_scale.train.trainer:run"),
        "export": Command("cobra_scale.train.configs:ExportConfig", "cobra_scale.train.export:run"),
        "eval": Command("cobra_scale.train.configs:EvalConfig", "cobra_scale.eval.run_eval:run"),
        "compare": Command("cobra_scale.eval.configs:CompareConfig", "cobra_scale.eval.compare:run"),
        "coldstart": Command("cobra_scale.eval.configs:ColdStartConfig", "cobra_scale.eval.cold_start:run"),
        "recommend": Command("cobra_scale.train.configs:RecommendConfig", "cobra_scale.retrieve.recommend_cli:run"),
        "serve": Command("cobra_scale.serve.configs:ServeConfig", "cobra_scale.serve.run_serve:run"),
        "index": Command("cobra_scale.retrieve.configs:IndexConfig", "cobra_scale.retrieve.build:run"),
        "prior": Command("cobra_scale.retrieve.configs:PriorConfig", "cobra_scale.retrieve.prior:run"),
    },
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_command(sub: argparse._SubParsersAction, name: str, command: Command) -> None:
    schema = _load(command.schema)
    doc = (schema.__doc__ or "").strip()
    p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
    p.add_argument("--config", "-c", metavar="YAML", help="config file (OmegaConf YAML) merged over the defaults")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for field_name, tp, default, help_text in cli_fields(schema):
        flag = "--" + field_name.replace("_", "-")
        suffix = f" (default: {default})" if default is not None else ""
        if tp is bool:
            p.add_argument(flag, dest=field_name, action=argparse.BooleanOptionalAction, default=None, help=help_text + suffix)
        else:
            p.add_argument(flag, dest=field_name, type=tp, default=None, metavar=field_name.upper(), help=help_text + suffix)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last (e.g. event_types=[click,conversion])")
    p.set_defaults(_command=command, _fields=[f[0] for f in cli_fields(schema)])


def _override_hint(args: argparse.Namespace, stray: list[str]) -> str:
    """For ``--name`` where ``name`` is a list or nested field of the command: how to set it instead."""
    command = getattr(args, "_command", None)
    if command is None:
        return ""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(_load(command.schema))}
    hints = []
    for arg in stray:
        name = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        if arg.startswith("--") and name in fields:
            hints.append(f"{name} is a list or a section: set it as a key=value override, e.g. {name}=[...] or {name}.KEY=VALUE")
    return ("; " + "; ".join(hints)) if hints else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cobra",
        description="cobra_scale: train and serve COBRA generative recommenders at scale.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND")
    for name, command in COMMANDS.get(None, {}).items():
        _add_command(groups, name, command)
    for group, commands in COMMANDS.items():
        if group is None:
            continue
        gp = groups.add_parser(group, help=f"{group} stage commands", description=f"cobra {group} ...")
        sub = gp.add_subparsers(dest="command", metavar="SUBCOMMAND")
        for name, command in commands.items():
            _add_command(sub, name, command)
        gp.set_defaults(_group_parser=gp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before, between or after the flags (argparse alone takes
    # the positionals in one run only and rejects the rest as unrecognised)
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}{_override_hint(args, stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("faiss.loader", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "_command", None) is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    command: Command = args._command
    try:
        schema = _load(command.schema)
        flags = {name: getattr(args, name) for name in args._fields}
        config = load_config(schema, args.config, overrides=flags, dotlist=args.overrides)
        if args.print_config:
            from cobra_scale.config import to_yaml

            print(to_yaml(config), end="")
            return 0
        runner: Callable[[Any], dict | None] = _load(command.runner)
        start = time.perf_counter()
        summary = runner(config)
        elapsed = time.perf_counter() - start
    except CobraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if summary:
        for key, value in summary.items():
            print(f"{key}: {value}")
    print(f"done in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
