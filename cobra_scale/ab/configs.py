"""Config schemas of A/B testing: the experiments file and the ``cobra ab ...`` commands.

The experiments file (YAML, schema :class:`ABConfig`) says how users are split::

    salt: cobra-ab-v1        # changing it reshuffles every user: never change it mid-experiment
    buckets: 10000           # users hash into 0..buckets-1, once per layer
    holdout: 0.02            # global holdout: these users join no experiment and get default_model
    default_model: cobra     # model version of users in no experiment (and of absent user ids)
    experiments:
      - name: beamfusion
        layer: model         # experiments of one layer own disjoint bucket ranges
        start: 0             # buckets [start, end) of the layer: here 10% of traffic
        end: 1000
        control: control     # the arm lifts are measured against
        arms:
          - {name: control, share: 0.5, model: cobra}
          - {name: no_fusion, share: 0.5, model: cobra_no_fusion}

Layers are orthogonal: each hashes the user with its own salt, so a user's arm in one layer
says nothing about their arm in another. Only one layer may choose the model version
(``model``); arms of other layers change request parameters (``params``, e.g. ``{tau: 0.5}``).

All checks live here (``__post_init__``) and fail with a one-line :class:`ConfigError`.
Dataclasses only: cheap to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError
from cobra_scale.serve.configs import AppConfig  # dataclasses only: cheap

# Arm names the router uses for users outside every experiment; experiments may not use them.
DEFAULT_ARM = "default"
HOLDOUT_ARM = "holdout"
EXPLICIT_ARM = "explicit"  # served: a request that named its model slot itself (outside experiments)
RESERVED_ARMS = (DEFAULT_ARM, HOLDOUT_ARM, EXPLICIT_ARM)
MAX_BUCKETS = 1_000_000  # the router keeps one table entry per bucket and layer
SHARE_TOLERANCE = 1e-6


@dataclass
class ArmConfig:
    """One arm of an experiment: its share of the experiment's buckets and what it serves."""

    name: str = field(help="arm name (unique inside the experiment)")
    share: Optional[float] = field(None, help="share of the experiment's buckets in (0, 1]; derived from `ranges` when those are given")
    model: Optional[str] = field(None, help="model version served to this arm (a name the serving app knows)")
    params: dict = field({}, help="request parameter overrides for this arm, e.g. {tau: 0.5}")
    ranges: list = field([], help="explicit bucket ranges [[start, end], ...] (written by `cobra ab reshare`); empty = laid out from shares")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("every arm needs a non-empty name")
        if self.name in RESERVED_ARMS:
            raise ConfigError(f"arm name '{self.name}' is reserved ({', '.join(RESERVED_ARMS)} name requests outside experiments)")
        if self.share is not None and not (0.0 < self.share <= 1.0):
            raise ConfigError(f"arm '{self.name}': share must be in (0, 1], got {self.share}")
        for key, value in self.params.items():
            if not isinstance(value, (int, float, str, bool)):
                raise ConfigError(f"arm '{self.name}': params.{key} must be a number, string or bool")
        ranges = []
        for r in self.ranges:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
                raise ConfigError(f"arm '{self.name}': ranges must be [start, end] pairs of integers, got {r}")
            if r[0] >= r[1]:
                raise ConfigError(f"arm '{self.name}': range [{r[0]}, {r[1]}) is empty")
            ranges.append([int(r[0]), int(r[1])])
        self.ranges = ranges

    @property
    def n_buckets(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass
class ExperimentConfig:
    """An experiment: a bucket range of one layer, split between arms."""

    name: str = field(help="experiment name (unique)")
    start: int = field(help="first bucket of the layer owned by the experiment")
    end: int = field(help="one past the last bucket owned by the experiment")
    layer: str = field("main", help="layer; experiments of different layers overlap orthogonally")
    control: Optional[str] = field(None, help="the arm lifts are measured against (default: the first arm)")
    arms: list[ArmConfig] = field([], help="at least two arms")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("every experiment needs a non-empty name")
        if not self.layer:
            raise ConfigError(f"experiment '{self.name}': layer must be non-empty")
        if self.start < 0 or self.end <= self.start:
            raise ConfigError(f"experiment '{self.name}': bucket range [{self.start}, {self.end}) must satisfy 0 <= start < end")
        if len(self.arms) < 2:
            raise ConfigError(f"experiment '{self.name}' needs at least two arms, got {len(self.arms)}")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"experiment '{self.name}': duplicate arm name(s) {', '.join(dup)}")
        if self.control is None:
            self.control = names[0]
        elif self.control not in names:
            raise ConfigError(f"experiment '{self.name}': control arm '{self.control}' is not one of its arms ({', '.join(names)})")
        explicit = [bool(a.ranges) for a in self.arms]
        if any(explicit) and not all(explicit):
            raise ConfigError(f"experiment '{self.name}': give `ranges` for every arm or for none")
        if all(explicit):
            self._check_explicit_ranges()
        else:
            self._layout_from_shares()

    @property
    def size(self) -> int:
        return self.end - self.start

    def _layout_from_shares(self) -> None:
        missing = [a.name for a in self.arms if a.share is None]
        if missing:
            raise ConfigError(f"experiment '{self.name}': arm(s) {', '.join(missing)} need a share")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ConfigError(f"experiment '{self.name}': arm shares sum to {total:g}, must sum to 1")
        counts = share_counts([a.share for a in self.arms], self.size)
        empty = [a.name for a, c in zip(self.arms, counts) if c == 0]
        if empty:
            raise ConfigError(f"experiment '{self.name}': arm(s) {', '.join(empty)} get no bucket of {self.size}; widen [start, end) or raise their share")
        # Contiguous, in arm order: moving shares between neighbouring arms (always the case
        # with two arms) moves only the buckets that change hands. For other changes,
        # `cobra ab reshare` writes explicit ranges that move the fewest buckets.
        at = self.start
        for arm, count in zip(self.arms, counts):
            arm.ranges = [[at, at + count]]
            arm.share = count / self.size
            at += count

    def _check_explicit_ranges(self) -> None:
        spans = sorted((start, end, a.name) for a in self.arms for start, end in a.ranges)
        for start, end, arm in spans:
            if start < self.start or end > self.end:
                raise ConfigError(f"experiment '{self.name}': arm '{arm}' range [{start}, {end}) lies outside the experiment's [{self.start}, {self.end})")
        for (s0, e0, a0), (s1, e1, a1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ConfigError(f"experiment '{self.name}': ranges of arms '{a0}' [{s0}, {e0}) and '{a1}' [{s1}, {e1}) overlap")
        covered = sum(e - s for s, e, _ in spans)
        if covered != self.size:
            raise ConfigError(f"experiment '{self.name}': arm ranges cover {covered} of its {self.size} buckets; they must cover [{self.start}, {self.end}) exactly")
        for a in self.arms:
            derived = a.n_buckets / self.size
            if a.share is not None and abs(a.share - derived) > 0.5 / self.size + SHARE_TOLERANCE:
                raise ConfigError(f"experiment '{self.name}': arm '{a.name}' share {a.share:g} disagrees with its ranges ({derived:g})")
            a.share = derived

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"experiment '{self.name}' has no arm '{name}' (arms: {', '.join(a.name for a in self.arms)})")


def share_counts(shares: list[float], size: int) -> list[int]:
    """Whole bucket counts for ``shares`` of ``size`` buckets (largest remainder, ties to earlier arms)."""
    exact = [s * size for s in shares]
    counts = [math.floor(x + 1e-9) for x in exact]
    left = size - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:max(left, 0)]:
        counts[i] += 1
    return counts


@dataclass
class ABConfig:
    """An experiments file: salt, buckets, global holdout, experiments in layers."""

    salt: str = field(help="hash salt; the same salt gives every user the same buckets on every machine")
    buckets: int = field(10_000, help="buckets per layer; traffic moves in steps of 1/buckets")
    holdout: float = field(0.0, help="share of users in the global holdout (no experiment, default model), in [0, 1)")
    default_model: Optional[str] = field(None, help="model version for users in no experiment and for absent/invalid user ids (None = the server's default)")
    experiments: list[ExperimentConfig] = field([], help="the running experiments")

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str) or not self.salt:
            raise ConfigError("salt must be a non-empty string")
        if not 2 <= self.buckets <= MAX_BUCKETS:
            raise ConfigError(f"buckets must be in [2, {MAX_BUCKETS}], got {self.buckets}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")
        names = [e.name for e in self.experiments]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"duplicate experiment name(s) {', '.join(dup)}")
        by_layer: dict[str, list[ExperimentConfig]] = {}
        for e in self.experiments:
            if e.end > self.buckets:
                raise ConfigError(f"experiment '{e.name}': range [{e.start}, {e.end}) exceeds the {self.buckets} buckets")
            by_layer.setdefault(e.layer, []).append(e)
        for layer, exps in by_layer.items():
            exps = sorted(exps, key=lambda e: e.start)
            for a, b in zip(exps, exps[1:]):
                if b.start < a.end:
                    raise ConfigError(f"experiments '{a.name}' [{a.start}, {a.end}) and '{b.name}' [{b.start}, {b.end}) overlap in layer '{layer}'")
        model_layers = sorted({e.layer for e in self.experiments if any(a.model for a in e.arms)})
        if len(model_layers) > 1:
            raise ConfigError(f"arms of layers {', '.join(model_layers)} all set `model`; only one layer may choose the model version")

    @property
    def holdout_buckets(self) -> int:
        return round(self.holdout * self.buckets)

    @property
    def layers(self) -> list[str]:
        """Layer names in order of first appearance."""
        return list(dict.fromkeys(e.layer for e in self.experiments))

    def experiment(self, name: str) -> ExperimentConfig:
        for e in self.experiments:
            if e.name == name:
                return e
        raise ConfigError(f"no experiment '{name}' (experiments: {', '.join(e.name for e in self.experiments) or 'none'})")

    def models(self) -> list[str]:
        """Every model version the config can route to (default first)."""
        out = [self.default_model] if self.default_model else []
        out += [a.model for e in self.experiments for a in e.arms if a.model]
        return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# Commands


@dataclass
class AssignConfig:
    """``cobra ab assign``: users Parquet in -> one row per (user, layer) with experiment and arm."""

    experiments: str = field(help="experiments file (YAML, see docs/ab.md)")
    users: str = field(help="Parquet file or folder holding the user ids")
    out: str = field(help="output Parquet file of assignments")
    user_column: str = field("user_id", help="column of --users holding the ids (int or string)")
    batch_rows: int = field(1_000_000, help="ids read and hashed at once (bounds memory)")

    def __post_init__(self) -> None:
        if self.batch_rows <= 0:
            raise ConfigError("batch_rows must be > 0")


@dataclass
class ReshareConfig:
    """``cobra ab reshare``: new arm shares (or range) for one experiment, moving the fewest users."""

    experiments: str = field(help="current experiments file (YAML)")
    experiment: str = field(help="the experiment to change")
    out: str = field(help="where to write the new experiments file (explicit arm ranges)")
    shares: dict = field({}, help="new shares by arm, e.g. shares.control=0.3 shares.treatment=0.7 (default: keep)")
    start: Optional[int] = field(None, help="new first bucket of the experiment (default: keep)")
    end: Optional[int] = field(None, help="new end bucket of the experiment, e.g. to ramp up (default: keep)")


@dataclass
class OutcomesConfig:
    """``cobra ab outcomes``: replay exposures against the next day's events -> per-user outcomes."""

    exposures: str = field(help="exposure log folder (Parquet shards of the exposure logger)")
    events: str = field(help="events folder (`cobra data synth` layout: events/day=YYYY-MM-DD/...)")
    out: str = field(help="output Parquet file of per-(experiment, user) outcomes")
    window_days: int = field(1, help="outcome window: this many days, starting the day after a user's first exposure")
    exposure_day: Optional[str] = field(None, help="offline replays: treat every exposure as made on this day (YYYY-MM-DD) of the logs, whenever it was served")

    def __post_init__(self) -> None:
        if self.window_days <= 0:
            raise ConfigError("window_days must be > 0")
        if self.exposure_day is not None:
            import datetime as dt

            try:
                dt.date.fromisoformat(self.exposure_day)
            except ValueError:
                raise ConfigError(f"exposure_day must be a date YYYY-MM-DD, got '{self.exposure_day}'") from None


@dataclass
class AnalyzeConfig:
    """``cobra ab analyze``: per-arm conversion and ARPU, lifts with confidence intervals, p-values, SRM check."""

    outcomes: str = field(help="outcomes Parquet of `cobra ab outcomes`")
    out: str = field(help="report folder: report.md, lift.png, analysis.json")
    experiments: Optional[str] = field(None, help="experiments file: expected arm shares for the SRM check and the control arm (default: equal shares, first arm)")
    attribution: str = field("shown", help="'shown': conversions/revenue on recommended items; 'all': any next-day conversion/revenue")
    alpha: float = field(0.05, help="significance level (CIs are 1 - alpha)")
    srm_threshold: float = field(0.001, help="SRM warning when the chi-square p-value is below this")
    bootstrap: int = field(2000, help="bootstrap resamples for the percentile CIs (0 = delta method only)")
    seed: int = field(0, help="bootstrap seed")

    def __post_init__(self) -> None:
        if self.attribution not in ("shown", "all"):
            raise ConfigError(f"attribution must be 'shown' or 'all', got '{self.attribution}'")
        if not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0.0 < self.srm_threshold < 1.0:
            raise ConfigError(f"srm_threshold must be in (0, 1), got {self.srm_threshold}")
        if self.bootstrap < 0:
            raise ConfigError("bootstrap must be >= 0")



# ----------------------------------------------------------------------------------------------
# Serving


@dataclass(kw_only=True)  # kw_only: a required field after AppConfig's defaulted ones
class ABAppConfig(AppConfig):
    """The A/B Serve application: several model slots behind one routing ingress (``cobra_scale.serve.ab_app:build_ab_app``)."""

    experiments: str = field(help="experiments file (YAML); it becomes the ingress user_config['ab'], changeable without a redeploy")
    models: dict = field({"cobra": {}}, help="model slots: name -> recommender settings over the app's (e.g. {cobra_no_fusion: {mode: no_fusion}} or {v2: {run: runs/v2}})")
    default_slot: Optional[str] = field(None, help="slot for users in no experiment when the experiments file has no default_model (default: the first slot)")
    exposures: Optional[str] = field(None, help="exposure log folder (Parquet shards); None = no exposure log")
    exposure_flush_s: float = field(2.0, help="exposure log: seconds between writes")

    def __post_init__(self) -> None:
        super().__post_init__()
        import re

        if not self.models:
            raise ConfigError("models must name at least one model slot")
        for name, overrides in self.models.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", str(name)):
                raise ConfigError(f"model slot name '{name}' must match [A-Za-z0-9_.-]{{1,64}}")
            if not isinstance(overrides, dict):
                raise ConfigError(f"models.{name} must be a mapping of recommender settings, got {overrides!r}")
        if self.default_slot is not None and self.default_slot not in self.models:
            raise ConfigError(f"default_slot '{self.default_slot}' is not one of the model slots ({', '.join(self.models)})")
        if self.exposure_flush_s <= 0:
            raise ConfigError("exposure_flush_s must be > 0")
