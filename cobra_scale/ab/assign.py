"""``cobra ab assign`` (offline assignment of a users table) and ``cobra ab reshare``.

Assignments are long-format: one row per (user, layer)::

    user_id   the id as read (int64 or string)
    layer     string
    bucket    int32, -1 for absent ids and holdout users
    experiment string, null when the user is in no experiment of that layer
    arm       string: the arm, or "default" / "holdout"
    model     string, the model version the router would serve (null = server default)

They are computed by the same :class:`~cobra_scale.ab.router.ABRouter` logic as online
routing (the buckets vectorised per batch), so offline and online agree by construction
(checked in tests/ab/test_assign.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cobra_scale.ab.bucketing import HOLDOUT_LAYER, buckets_of, canonical_user_id, layer_table, moved_buckets, reshare
from cobra_scale.ab.configs import DEFAULT_ARM, HOLDOUT_ARM, ABConfig, AssignConfig, ReshareConfig
from cobra_scale.ab.router import load_ab_config
from cobra_scale.config import save_config, to_yaml
from cobra_scale.data.io import iter_batches, list_parquet_files
from cobra_scale.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ASSIGNMENTS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("bucket", pa.int32(), nullable=False),
        pa.field("experiment", pa.string(), nullable=True),
        pa.field("arm", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=True),
    ],
    metadata={"cobra_scale.table": "ab_assignments"},
)


def assign_ids(cfg: ABConfig, user_ids: list) -> dict[str, dict[str, np.ndarray]]:
    """Routing of many ids at once: ``{layer: {"bucket", "experiment", "arm", "model"}}``, arrays of len(ids).

    Same answer as :meth:`ABRouter.route` per id; ``model`` is the version the user is served
    (chosen by the model layer), repeated on every layer's row.
    """
    keys = [canonical_user_id(u) for u in user_ids]
    n = len(keys)
    if cfg.holdout_buckets:
        hb = buckets_of(keys, cfg.salt, HOLDOUT_LAYER, cfg.buckets)
        held = (hb >= 0) & (hb < cfg.holdout_buckets)
    else:
        held = np.zeros(n, dtype=bool)
    owners, code_of = [], {}  # owner code c >= 1 -> owners[c - 1]; 0 = bucket owned by no experiment
    for e_idx, exp in enumerate(cfg.experiments):
        for a_idx, arm in enumerate(exp.arms):
            owners.append((exp, arm))
            code_of[(e_idx, a_idx)] = len(owners)
    model = np.full(n, cfg.default_model, dtype=object)
    out = {}
    for layer in cfg.layers:
        code = np.array([0 if o is None else code_of[o] for o in layer_table(cfg, layer)], dtype=np.int64)
        bucket = buckets_of(keys, cfg.salt, layer, cfg.buckets)
        owner = np.where(bucket >= 0, code[np.maximum(bucket, 0)], 0)
        owner[held] = 0
        exp_col = np.full(n, None, dtype=object)
        arm_col = np.full(n, DEFAULT_ARM, dtype=object)
        for c in np.unique(owner[owner > 0]):
            exp, arm = owners[int(c) - 1]
            rows = owner == c
            exp_col[rows], arm_col[rows] = exp.name, arm.name
            if arm.model:
                model[rows] = arm.model
        arm_col[held] = HOLDOUT_ARM
        bucket[held] = -1
        out[layer] = {"bucket": bucket, "experiment": exp_col, "arm": arm_col, "model": model}
    return out


def run(cfg: AssignConfig) -> dict:
    ab = load_ab_config(cfg.experiments)
    if not ab.experiments:
        raise ConfigError(f"{cfg.experiments} lists no experiment: nothing to assign")
    files = list_parquet_files(cfg.users)
    first = pq.read_schema(files[0])
    if cfg.user_column not in first.names:
        raise DataError(f"{files[0]} has no column '{cfg.user_column}' (columns: {', '.join(first.names)})")
    id_type = first.field(cfg.user_column).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise DataError(f"column '{cfg.user_column}' must hold integer or string ids, got {id_type}")
    out = Path(cfg.out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out must be a .parquet file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    schema = pa.schema([pa.field("user_id", id_type)] + list(ASSIGNMENTS_SCHEMA), metadata=ASSIGNMENTS_SCHEMA.metadata)
    counts: Counter = Counter()
    users = absent = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer, tqdm(desc="assign", unit=" users", disable=None) as bar:
        for f in files:
            for batch in iter_batches(f, columns=[cfg.user_column], batch_rows=cfg.batch_rows):
                col = batch.column(0)
                if col.type != id_type:
                    raise DataError(f"{f}: column '{cfg.user_column}' is {col.type}, other files have {id_type}")
                ids = col.to_pylist()
                routed = assign_ids(ab, ids)
                users += len(ids)
                absent += sum(canonical_user_id(u) is None for u in ids)
                for layer, cols in routed.items():
                    writer.write_table(
                        pa.table(
                            {
                                "user_id": col,
                                "layer": pa.array([layer] * len(ids), pa.string()),
                                "bucket": pa.array(cols["bucket"].astype(np.int32)),
                                "experiment": pa.array(cols["experiment"].tolist(), pa.string()),
                                "arm": pa.array(cols["arm"].tolist(), pa.string()),
                                "model": pa.array(cols["model"].tolist(), pa.string()),
                            },
                            schema=schema,
                        )
                    )
                    counts.update(zip(cols["experiment"].tolist(), cols["arm"].tolist()))
                bar.update(len(ids))
    tmp.replace(out)
    save_config(cfg, out.parent, filename=f"{out.stem}.config.yaml")
    summary: dict = {"users": users, "absent_ids": absent, "layers": len(ab.layers), "out": str(out)}
    for (exp, arm), c in sorted(counts.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        if exp is not None:
            summary[f"{exp}/{arm}"] = c
    return summary


def run_reshare(cfg: ReshareConfig) -> dict:
    ab = load_ab_config(cfg.experiments)
    old = ab.experiment(cfg.experiment)
    shares = {str(k): float(v) for k, v in cfg.shares.items()}
    new_cfg = reshare(ab, cfg.experiment, shares, cfg.start, cfg.end)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# written by: cobra ab reshare --experiments {cfg.experiments} --experiment {cfg.experiment}\n"
    out.write_text(header + to_yaml(new_cfg))
    moved = moved_buckets(old, new_cfg.experiment(cfg.experiment))
    summary: dict = {"out": str(out), "buckets_moved": sum(moved.values())}
    for (a, b), n in sorted(moved.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        summary[f"{a or '(outside)'} -> {b or '(outside)'}"] = n
    return summary
