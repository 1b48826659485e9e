"""Deterministic bucketing: user id -> bucket per layer, and bucket -> (experiment, arm).

A user's bucket in a layer is ``blake2b(salt | layer | user) mod buckets``: a keyed
cryptographic hash, so it is the same on every process, machine and restart (unlike
Python's ``hash``, which is randomised per process), uniform, and independent across
layers (each layer is a different hash input). The global holdout is one more "layer"
named :data:`HOLDOUT_LAYER`.

User ids are canonicalised to strings before hashing: ``42``, ``np.int64(42)`` and
``"42"`` are the same user. ``None``, ``""``, whitespace, NaN, bools and other types are
*absent* ids: they join no experiment and get the default model (see docs/ab.md).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import replace
from typing import Any, Iterable, Mapping

import numpy as np

from cobra_scale.ab.configs import ABConfig, ArmConfig, ExperimentConfig, share_counts
from cobra_scale.errors import ConfigError

HOLDOUT_LAYER = "__holdout__"
_SEP = "\x1f"  # unit separator: cannot collide with printable salts, layer names or ids
_MAX_ID_CHARS = 256  # longer ids are treated as absent (a malformed request, not a user)


def canonical_user_id(user_id: Any) -> str | None:
    """The string a user id is hashed as, or ``None`` for an absent/invalid id."""
    if user_id is None or isinstance(user_id, bool):
        return None
    if isinstance(user_id, numbers.Integral):
        return str(int(user_id))
    if isinstance(user_id, str):
        key = user_id.strip()
        return key if key and len(key) <= _MAX_ID_CHARS else None
    if isinstance(user_id, numbers.Real) and math.isfinite(user_id) and float(user_id).is_integer():
        return str(int(user_id))  # ids read back as floats (e.g. JSON 42.0) are still that user
    return None


def bucket_of(key: str, salt: str, layer: str, buckets: int) -> int:
    """Bucket in ``0..buckets-1`` of canonical id ``key`` in ``layer``."""
    digest = hashlib.blake2b(f"{salt}{_SEP}{layer}{_SEP}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets  # 2^64 mod 10^4: bias below 1e-15


def buckets_of(keys: Iterable[str | None], salt: str, layer: str, buckets: int) -> np.ndarray:
    """(N,) int64 buckets of canonical ids; -1 for absent ids."""
    prefix = hashlib.blake2b(f"{salt}{_SEP}{layer}{_SEP}".encode(), digest_size=8)
    out = []
    for key in keys:
        if key is None:
            out.append(-1)
            continue
        h = prefix.copy()  # the prefix state is hashed once; each id only adds its own bytes
        h.update(key.encode())
        out.append(int.from_bytes(h.digest(), "big") % buckets)
    return np.asarray(out, dtype=np.int64)


def layer_table(cfg: ABConfig, layer: str) -> list[tuple[int, int] | None]:
    """``table[bucket] = (experiment index, arm index)`` in ``cfg.experiments``, or None if unowned."""
    table: list[tuple[int, int] | None] = [None] * cfg.buckets
    for e_idx, exp in enumerate(cfg.experiments):
        if exp.layer != layer:
            continue
        for a_idx, arm in enumerate(exp.arms):
            for start, end in arm.ranges:
                table[start:end] = [(e_idx, a_idx)] * (end - start)
    return table


def arm_buckets(exp: ExperimentConfig) -> dict[str, list[int]]:
    """Arm name -> sorted buckets it owns."""
    return {a.name: sorted(b for s, e in a.ranges for b in range(s, e)) for a in exp.arms}


def to_ranges(buckets: Iterable[int]) -> list[list[int]]:
    """Sorted buckets -> ``[[start, end), ...]`` runs."""
    out: list[list[int]] = []
    for b in sorted(buckets):
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


def reshare(cfg: ABConfig, experiment: str, shares: Mapping[str, float] | None = None, start: int | None = None, end: int | None = None) -> ABConfig:
    """A new config where ``experiment`` has new arm ``shares`` and/or bucket range, moving the fewest users.

    Every bucket that can keep its arm keeps it: an arm whose bucket count shrinks releases its
    highest buckets, an arm that grows takes the lowest free buckets (released ones and those
    new to the range). The result carries explicit arm ``ranges``, so every replica that loads
    it routes identically, whatever history of changes led to it.

    Raises:
        ConfigError: unknown experiment or arm, shares not summing to 1, an invalid new range.
    """
    exp = cfg.experiment(experiment)
    names = [a.name for a in exp.arms]
    shares = dict(shares or {})
    unknown = sorted(set(shares) - set(names))
    if unknown:
        raise ConfigError(f"experiment '{experiment}' has no arm(s) {', '.join(unknown)} (arms: {', '.join(names)})")
    new_share = {a.name: float(shares.get(a.name, a.share)) for a in exp.arms}
    total = sum(new_share.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"experiment '{experiment}': new shares sum to {total:g}, must sum to 1")
    new_start = exp.start if start is None else int(start)
    new_end = exp.end if end is None else int(end)
    if new_start < 0 or new_end <= new_start:
        raise ConfigError(f"experiment '{experiment}': new range [{new_start}, {new_end}) must satisfy 0 <= start < end")
    target = dict(zip(names, share_counts([new_share[n] for n in names], new_end - new_start)))

    owned = arm_buckets(exp)
    taken: set[int] = set()
    keep: dict[str, list[int]] = {}
    for name in names:
        inside = [b for b in owned[name] if new_start <= b < new_end]
        keep[name] = inside[: target[name]]  # shrinking arms give back their highest buckets
        taken.update(keep[name])
    free = iter(b for b in range(new_start, new_end) if b not in taken)
    arms = []
    for arm in exp.arms:
        got = keep[arm.name] + [next(free) for _ in range(target[arm.name] - len(keep[arm.name]))]
        arms.append(ArmConfig(name=arm.name, share=None, model=arm.model, params=dict(arm.params), ranges=to_ranges(got)))
    new_exp = ExperimentConfig(name=exp.name, start=new_start, end=new_end, layer=exp.layer, control=exp.control, arms=arms)
    experiments = [new_exp if e.name == experiment else e for e in cfg.experiments]
    return replace(cfg, experiments=experiments)  # re-runs every check (overlaps, bucket bounds)


def moved_buckets(old: ExperimentConfig, new: ExperimentConfig) -> dict[tuple[str | None, str | None], int]:
    """``{(old arm, new arm): buckets}`` of buckets whose arm changed (None = outside the experiment)."""
    before = {b: name for name, bs in arm_buckets(old).items() for b in bs}
    after = {b: name for name, bs in arm_buckets(new).items() for b in bs}
    out: dict[tuple[str | None, str | None], int] = {}
    for b in set(before) | set(after):
        pair = (before.get(b), after.get(b))
        if pair[0] != pair[1]:
            out[pair] = out.get(pair, 0) + 1
    return out
