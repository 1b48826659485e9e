"""``cobra compare``: is run B ahead of run A beyond the sampling of users and targets?

Two runs scored on the same users (``cobra eval per_user=true``, same split and user sample)
are compared user by user: the mean of each user's B − A, with a paired normal interval and a
paired bootstrap interval (:func:`~cobra_scale.eval.metrics.paired_difference`). Seeds of one
config share the users and targets, so a gap consistent across seeds can still be target
sampling; this is the check for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cobra_scale.errors import DataError
from cobra_scale.eval.configs import CompareConfig
from cobra_scale.eval.metrics import paired_difference


def _read(path: str, split_name: str):
    from cobra_scale.data.io import read_table

    p = Path(path)
    if p.is_dir():
        p = p / f"per_user_{split_name}.parquet"
    if not p.is_file():
        raise DataError(f"{p} not found (write it with `cobra eval ... per_user=true`)")
    table = read_table(p)
    if not {"user_id", "has_target"} <= set(table.column_names):
        raise DataError(f"{p} has no user_id/has_target columns (is it a per_user file of `cobra eval`?)")
    return p, table


def _column(table, path: Path, setting: str, metric: str) -> np.ndarray:
    key = f"{setting}/{metric}"
    if key not in table.column_names:
        have = sorted({c.rsplit("/", 1)[0] for c in table.column_names if "/" in c})
        metrics = sorted({c.rsplit("/", 1)[1] for c in table.column_names if "/" in c})
        raise DataError(f"{path} has no column {key!r}: settings {have}, metrics {metrics}")
    return np.asarray(table.column(key), dtype=np.float64)


def run(cfg: CompareConfig) -> dict:
    pa_path, ta = _read(cfg.a, cfg.split_name)
    pb_path, tb = _read(cfg.b, cfg.split_name)
    setting_b = cfg.setting_b or cfg.setting
    ua = np.asarray(ta.column("user_id").to_pylist(), dtype=object)
    ub = np.asarray(tb.column("user_id").to_pylist(), dtype=object)
    if len(set(ua)) != len(ua) or len(set(ub)) != len(ub):
        raise DataError("a per-user file lists a user twice")
    common = sorted(set(ua) & set(ub), key=str)
    if not cfg.intersect and (len(common) != len(ua) or len(common) != len(ub)):
        raise DataError(f"A and B scored different users ({len(ua)} and {len(ub)}, {len(common)} in common): evaluate both on the same "
                        "split and sample (max_users, seed), or pass intersect=true")
    if len(common) < 2:
        raise DataError(f"A and B share {len(common)} user(s): nothing to compare")
    pos_a = {u: i for i, u in enumerate(ua)}
    pos_b = {u: i for i, u in enumerate(ub)}
    ia = np.array([pos_a[u] for u in common])
    ib = np.array([pos_b[u] for u in common])
    has_a = np.asarray(ta.column("has_target"), dtype=bool)[ia]
    has_b = np.asarray(tb.column("has_target"), dtype=bool)[ib]
    if not np.array_equal(has_a, has_b):
        raise DataError(f"A and B disagree on which users have a target ({int((has_a != has_b).sum())} users): were they scored on the same split?")
    ia, ib = ia[has_a], ib[has_a]
    if len(ia) < 2:
        raise DataError(f"fewer than 2 common users have a target ({len(ia)})")
    pairs = {m: (_column(ta, pa_path, cfg.setting, m)[ia], _column(tb, pb_path, setting_b, m)[ib]) for m in cfg.metrics}
    if cfg.combined and len(cfg.metrics) > 1:
        pairs[" + ".join(cfg.metrics)] = (sum(p[0] for p in pairs.values()), sum(p[1] for p in pairs.values()))
    results = {name: paired_difference(x, y, cfg.confidence, cfg.resamples, cfg.seed) for name, (x, y) in pairs.items()}
    report = {"a": str(pa_path), "b": str(pb_path), "setting_a": cfg.setting, "setting_b": setting_b, "users": int(len(ia)),
              "confidence": cfg.confidence, "resamples": cfg.resamples, "metrics": results}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
    pct = round(cfg.confidence * 100)
    summary = {"users": report["users"]}
    for name, r in results.items():
        summary[f"{name}: B - A"] = (f"{r['diff']:+.4f} (A {r['mean_a']:.4f}, B {r['mean_b']:.4f}); {pct}% paired normal "
                                     f"[{r['normal'][0]:+.4f}, {r['normal'][1]:+.4f}], bootstrap [{r['bootstrap'][0]:+.4f}, "
                                     f"{r['bootstrap'][1]:+.4f}]; users B better {r['users_b_better']}, A better {r['users_a_better']}")
    if cfg.out:
        summary["out"] = cfg.out
    return summary
