"""``cobra coldstart``: how each inference mode handles items never seen in training.

Test users of a ``loo_cold`` split fall into two segments by their target: **in-set**
(an item seen in training) and **cold** (one of ``cold_items.parquet``, text and ID known,
interactions not). Recall/NDCG@{5,10} are reported per segment for

* COBRA (BeamFusion), LIGER mode and dense retrieval (``no_fusion``) of the full model;
* COBRA w/o Dense (TIGER-like, ``sparse_only``) when ``sparse_run`` is given;
* the w/o-ID model (``dense_only``) when ``dense_run`` is given.

LIGER and the full model see the cold items through the same catalogue the tokenizer and
quantiser built; nothing is retrained.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cobra_scale.errors import DataError
from cobra_scale.eval.configs import ColdStartConfig

log = logging.getLogger(__name__)

SEGMENTS = ("in_set", "cold")


def segment_users(targets: list[np.ndarray], cold: np.ndarray) -> dict[str, np.ndarray]:
    """Users (row indices) whose target is a cold item vs not. Users with several targets are
    'cold' when any target is cold."""
    is_cold = np.array([bool(np.isin(t, cold).any()) for t in targets], dtype=bool)
    return {"in_set": np.flatnonzero(~is_cold), "cold": np.flatnonzero(is_cold)}


def sample_segments(segments: dict[str, np.ndarray], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """At most ``n`` users of each segment (seeded, in their original order); all when ``n`` is 0."""
    rng = np.random.default_rng(seed)
    return {k: (np.sort(rng.choice(rows, n, replace=False)) if n and len(rows) > n else rows) for k, rows in segments.items()}


def recall_half_width(recall: float, users: int, z: float = 1.96) -> float:
    """95% half-width of a segment's mean recall, normal approximation ``z·sqrt(p(1-p)/n)``.

    Exact for one target per user (a 0/1 hit); with several targets per-user recall lies
    in [0, 1] with mean p, whose variance is at most p(1-p), so the width is an upper bound.
    """
    return float(z * np.sqrt(max(recall * (1 - recall), 0.0) / users)) if users else 0.0


def evaluate_segments(rec, history: torch.Tensor, targets: list[np.ndarray], params, segments: dict[str, np.ndarray], batch_users: int, device) -> dict:
    from cobra_scale.eval.offline import evaluate

    out = {}
    for name, rows in segments.items():
        if len(rows) == 0:
            out[name] = {"users": 0}
            continue
        sel = torch.from_numpy(rows)
        m = evaluate(rec, history[sel], [targets[i] for i in rows], params, batch_users=batch_users, device=device)
        out[name] = {"users": int(len(rows)), **m, **{f"{k}_hw95": recall_half_width(v, len(rows)) for k, v in m.items() if k.startswith("recall@")}}
    return out


def _load(run: str):
    from cobra_scale.train.trainer import inference_params, load_run, make_recommender

    from cobra_scale.train.data import cold_item_indices

    model, catalogue, tcfg, device = load_run(run)
    split = Path(tcfg.data) / "splits" / tcfg.split
    cold = cold_item_indices(split, catalogue)
    if cold is None:
        raise DataError(f"{run} was trained on split {split}, which has no cold_items.parquet (make one with `cobra data split kind=loo_cold`)")
    if (cold < 0).any():
        raise DataError(f"{int((cold < 0).sum())} cold item(s) of {split / 'cold_items.parquet'} are missing from the run's catalogue")
    rec = make_recommender(model, catalogue, device)
    rec.cold_items = torch.from_numpy(cold).to(device)
    return rec, catalogue, tcfg, device, split, cold, inference_params(tcfg.inference)


def run(cfg: ColdStartConfig) -> dict:
    from cobra_scale.train.data import load_examples

    started = time.perf_counter()
    rec, catalogue, tcfg, device, split, cold, base = _load(cfg.run)
    examples = load_examples(split / cfg.split_name, catalogue, tcfg.model.max_items - 1).sample(cfg.max_users)
    segments = segment_users(examples.targets, cold)
    log.info("%d users: %d with an in-set target, %d with a cold-start target (%d cold items)", len(examples.targets), len(segments["in_set"]), len(segments["cold"]), len(cold))
    segments = sample_segments(segments, cfg.max_segment_users)
    if cfg.max_segment_users:
        log.info("evaluating %d in-set and %d cold users (max_segment_users=%d)", len(segments["in_set"]), len(segments["cold"]), cfg.max_segment_users)
    rows = {}
    for mode in cfg.modes:
        params = replace(base, mode=mode, exclude_history=cfg.exclude_history)
        if mode == "liger":
            params = replace(params, beams=cfg.liger_beams)
        rows[f"COBRA ({mode})" if mode != "liger" else "LIGER mode"] = evaluate_segments(rec, examples.history, examples.targets, params, segments, cfg.batch_users, device)
    for other, mode, label in ((cfg.sparse_run, "sparse_only", "COBRA w/o Dense (TIGER-like)"), (cfg.dense_run, "dense_only", "w/o ID (dense only)")):
        if not other:
            continue
        orec, ocat, ocfg, odev, osplit, _, obase = _load(other)
        if osplit.resolve() != split.resolve():
            raise DataError(f"{other} was trained on {osplit}, the full model on {split}: compare runs of one split")
        if not np.array_equal(ocat.item_ids, catalogue.item_ids):
            raise DataError(f"{other} has a different item catalogue from {cfg.run}")
        params = replace(obase, mode=mode, exclude_history=cfg.exclude_history)
        rows[label] = evaluate_segments(orec, examples.history, examples.targets, params, segments, cfg.batch_users, odev)
    result = {
        "split": str(split),
        "split_name": cfg.split_name,
        "users": len(examples.targets),
        "segment_users": {k: int(len(v)) for k, v in segments.items()},
        "cold_items": int(len(cold)),
        "rows": rows,
        "wall_minutes": round((time.perf_counter() - started) / 60, 2),
    }
    out = Path(cfg.out or cfg.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coldstart.json").write_text(json.dumps(result, indent=2))
    (out / "coldstart.md").write_text(markdown_table(result))
    return {"table": str(out / "coldstart.md"), **{f"{k} {seg} recall@10": round(v[seg].get("recall@10", 0.0), 4) for k, v in rows.items() for seg in SEGMENTS}}


def markdown_table(result: dict) -> str:
    first = next(iter(result["rows"].values()))
    lines = [
        f"Segments of {result['split']} ({result['split_name']}): in-set targets {first['in_set']['users']} users, "
        f"cold-start targets {first['cold']['users']} users ({result['cold_items']} cold items). "
        "R@10 ± the 95% half-width of the segment mean.",
        "",
        "| model / mode | in-set R@5 | in-set N@5 | in-set R@10 | in-set N@10 | cold R@5 | cold N@5 | cold R@10 | cold N@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, seg in result["rows"].items():
        cells = []
        for s in SEGMENTS:
            for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
                cell = f"{seg[s].get(m, 0.0):.4f}"
                if m == "recall@10" and f"{m}_hw95" in seg[s]:
                    cell += f" ± {seg[s][m + '_hw95']:.4f}"
                cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
