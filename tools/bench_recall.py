"""The industrial-style benchmark of issue #7: Recall@50..800 on synthetic logs, COBRA and its ablations.

Stages (each skips what is already done, so a run can span sessions; logs in <root>/logs/):

    python tools/bench_recall.py data   --root /tmp/bench/r1m --users 1000000 --items 1000000
    python tools/bench_recall.py ids    --root /tmp/bench/r1m
    python tools/bench_recall.py train  --root /tmp/bench/r1m --runs full noid --minutes 60 --steps 150
    python tools/bench_recall.py train  --root /tmp/bench/r1m --runs nodense --minutes 60 --steps 150
    python tools/bench_recall.py index  --root /tmp/bench/r1m --runs full noid
    python tools/bench_recall.py eval   --root /tmp/bench/r1m --runs full noid nodense --users 20000
    python tools/bench_recall.py table  --root /tmp/bench/r1m

* ``data``: ``cobra data synth`` -> ``sessionize`` -> ``split kind=time`` (docs/data.md): test = the
  items of the last day (14) from the history before it, valid = those of day 13, train = days 1..12.
* ``ids``: ``cobra ids`` with ``embed.pooling=static`` (the mean of MiniLM's input token embeddings:
  contextual MiniLM runs at ~113 items/s on these 2 cores, 2.5 h for 1M items) and residual k-means:
  3 x 32 codes, and 4 x 32 for w/o Dense (its dedup code must number an ID's items within 32).
* ``train``: the runs side by side, one torch thread each (``--parallel``): ``full`` (COBRA),
  ``noid`` (w/o ID: dense only), ``nodense`` (w/o Dense: TIGER-like, a 4th code numbers the items of
  an ID); ``full_items`` (COBRA with Beauty's dense path: per-item rows from co-occurrence, not in the
  paper; run it by name) and ``noid_items`` (its w/o ID); session 23's variants of ``full_items``:
  ``full_dw3`` (dense loss 3x), ``full_idbank`` / ``noid_idbank`` (``id_bank_negatives``) and the probe
  ``full_sw0`` (no code loss); session 24's ``full_dw10`` (dense loss 10x) and ``full_dw3_hd`` / ``full_dw10_hd``
  (+ ``model.history_dense_weight``, an auxiliary dense loss before the ID). w/o BeamFusion is the full model's ``no_fusion`` mode. Each epoch is capped at ``--steps``
  steps (``steps_per_epoch``; a fresh sample of windows per epoch) and validated on ``--valid-users``.
* ``index``: ``cobra index`` of each dense run (faiss IVF whose inverted lists are the sparse IDs).
* ``eval``: ``cobra eval`` on the test day over a uniform sample of ``--users`` users (w/o Dense:
  ``--sparse-users``, as it needs 800 beams for 800 items), Recall/NDCG/diversity @ 50..800,
  settings chosen on the validation day.
* ``table``: one Markdown table (and JSON) of every run's eval.
* ``lines``: on ``line_size`` logs, how well each ID folder groups product lines: the mean share of a
  line's items in its most common prefix at each level (a line's 8 items in one ID = 1.0), against the
  same share for topics.

IDs with behaviour (``cobra ids behaviour.*``: the quantiser's input is text + co-occurrence) go to a second
root that links the first one's data, so both sets of runs share logs and splits::

    mkdir -p ROOT_beh/ids && for x in raw sequences splits items.parquet; do ln -s "$(realpath ROOT/$x)" ROOT_beh/$x; done
    ln -s "$(realpath ROOT/ids/embeddings.safetensors)" ROOT_beh/ids/   # the text embeddings, reused
    python tools/bench_recall.py ids --root ROOT_beh -- behaviour.sequences=ROOT_beh/splits/time/train

Extra ``key=value`` arguments after ``--`` go to ``cobra data synth`` (data, e.g. ``line_size=8``), every
``cobra train`` (train) or ``cobra eval`` (eval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed import ENV, ROOT, cobra  # noqa: E402  (the environment and command line of every cobra subprocess)

KS = "[50,100,200,500,800]"
# BeamFusion's candidates per beam (the paper's N): IDs with behaviour hold up to ~87k items (the items with no
# co-occurrence fall together), text IDs up to ~900; every ID's best 1,000 by cosine (validation, index and eval alike)
MAX_PER_ID = 1000
# the model of configs/train/beauty.yaml (mean-pooled text encoder), sized for short synthetic titles
MODEL = [
    "model.d_model=128", "model.encoder_dim=128", "model.decoder_layers=2", "model.encoder_layers=1", "model.text_tokens=24",
    "model.text_pooling=mean", "model.max_items=21", "model.dropout=0.1", "batch_size=128", "lr=0.002", "warmup_steps=100",
    "same_id_negatives=2", "patience=3", "inference.beams=40", f"inference.max_per_id={MAX_PER_ID}",
]
ID_BANK = 255
RUNS = {
    "full": [],
    "noid": ["model.use_sparse=false", "inference.mode=dense_only"],
    "nodense": ["model.use_dense=false", "dedup_level=true", "inference.mode=sparse_only"],
    # COBRA with the dense path of configs/train/beauty.yaml: a free per-item row on the text vector, started from the
    # item's co-occurrence vector (PPMI-SVD of the training days); not in the paper
    "full_items": ["model.item_embedding=true", "item_embedding_init=behaviour"],
    # w/o ID with that same dense path (the ablation of full_items: one flag off)
    "noid_items": ["model.use_sparse=false", "inference.mode=dense_only", "model.item_embedding=true", "item_embedding_init=behaviour"],
    # full_items + a dense term inside the target's own ID (up to 255 of its items from a bank of every item's latest
    # vector): the in-batch softmax barely trains P(item | ID), since its negatives almost all lie in other IDs
    "full_idbank": ["model.item_embedding=true", "item_embedding_init=behaviour", f"id_bank_negatives={ID_BANK}"],
    # its w/o ID: the same negatives, one flag off
    "noid_idbank": ["model.use_sparse=false", "inference.mode=dense_only", "model.item_embedding=true", "item_embedding_init=behaviour",
                    f"id_bank_negatives={ID_BANK}"],
    # diagnostics of COBRA's ID-conditioned dense vector (session 23): the dense loss weighted 3x; the code loss off
    # (the codes are then untrained, but the dense vector still reads the true IDs of the history and the target)
    "full_dw3": ["model.item_embedding=true", "item_embedding_init=behaviour", "model.dense_weight=3"],
    "full_sw0": ["model.item_embedding=true", "item_embedding_init=behaviour", "model.sparse_weight=0"],
    # the dense_weight grid on validation (session 24)
    "full_dw10": ["model.item_embedding=true", "item_embedding_init=behaviour", "model.dense_weight=10"],
    # + the auxiliary dense loss from the position before the target's codes (no ID given; model.history_dense_weight)
    "full_dw3_hd": ["model.item_embedding=true", "item_embedding_init=behaviour", "model.dense_weight=3", "model.history_dense_weight=3"],
    "full_dw10_hd": ["model.item_embedding=true", "item_embedding_init=behaviour", "model.dense_weight=10", "model.history_dense_weight=10"],
}
# rule 25 (session 39): the successor rows of configs/train/beauty.yaml (per-item rows of the last history items on the
# next item's hidden states; the code heads read the last 3 items' rows, the dense head the last one's) on every model
SUCC = ["model.successor_embedding=true", "model.successor_context=3", "model.successor_context_dense=1"]
RUNS["full_dw3_hd_succ"] = RUNS["full_dw3_hd"] + SUCC
RUNS["noid_items_succ"] = RUNS["noid_items"] + SUCC
RUNS["nodense_succ"] = RUNS["nodense"] + SUCC
EVAL = {
    # tau/beams chosen on the validation day; psi as on Beauty
    "full": ["modes=[cobra,no_fusion]", "grid_tau=[0.3,1,3]", "grid_psi=[20]", "grid_beams=[40]", "grid_normalize=[per_beam,global]",
             "tau_sweep=[0.1,0.3,1,3,10]", "plots=true"],
    "noid": ["modes=[dense_only]"],
    # one item per beam: Recall@800 needs 800 beams (~20x the per-user cost of 40), hence its smaller sample (--sparse-users)
    "nodense": ["modes=[sparse_only]", "grid_beams=[800]", "batch_users=50"],
}
EVAL["full_items"] = EVAL["full"]
EVAL["noid_items"] = EVAL["noid"]
EVAL["full_idbank"] = EVAL["full"]
EVAL["noid_idbank"] = EVAL["noid"]
EVAL["full_dw3"] = EVAL["full_sw0"] = EVAL["full_dw10"] = EVAL["full_dw3_hd"] = EVAL["full_dw10_hd"] = EVAL["full"]
EVAL["full_dw3_hd_succ"], EVAL["noid_items_succ"], EVAL["nodense_succ"] = EVAL["full"], EVAL["noid"], EVAL["nodense"]
LABEL = {"cobra": "COBRA", "no_fusion": "w/o BeamFusion", "dense_only": "w/o ID", "sparse_only": "w/o Dense"}


def env(threads: int | None = None) -> dict:
    out = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV.items()}}
    if threads:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def run_logged(cmd: list[str], log: Path, threads: int | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    fh = open(log, "a")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(threads), cwd=ROOT)


def wait_all(procs: dict[str, subprocess.Popen]) -> None:
    failed = []
    for name, proc in procs.items():
        if proc.wait() != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see the logs under <root>/logs)")


def stage_data(args, extra) -> None:
    root = Path(args.root)
    if (root / "splits" / "time" / "split_report.json").is_file():
        print(f"data: {root} is ready")
        return
    steps = [
        ("synth", cobra("data", "synth", "--users", str(args.users), "--items", str(args.items), "--days", str(args.days),
                        "--out", str(root / "raw"), "overwrite=true", f"seed={args.seed}", *extra)),
        ("sessionize", cobra("data", "sessionize", "--events", str(root / "raw" / "events"), "--items", str(root / "raw" / "items.parquet"),
                             "--out", str(root / "sequences"))),
        ("split", cobra("data", "split", "--sequences", str(root / "sequences"), "--out", str(root / "splits" / "time"), "kind=time")),
    ]
    for name, cmd in steps:
        t = time.perf_counter()
        wait_all({name: run_logged(cmd, root / "logs" / f"data_{name}.log")})
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    shutil.copy2(root / "raw" / "items.parquet", root / "items.parquet")


def stage_ids(args, extra) -> None:
    """3 x 32 codes for COBRA and w/o ID; 4 x 32 for w/o Dense, whose 5th (dedup) code must number
    the items of an ID within 32 (3 x 32 leaves ~30 items per ID at 1M items, some far more)."""
    root = Path(args.root)
    cache = root / "ids" / "embeddings.safetensors"
    for folder, levels in (("ids", 3), ("ids_item", 4)):
        if (root / folder / "sids.parquet").is_file():
            print(f"ids: {root / folder} is ready")
            continue
        cmd = cobra("ids", "--items", str(root / "items.parquet"), "--out", str(root / folder), "embed.pooling=static",
                    "embed.max_length=32", "embed.batch_size=1024", f"embed.cache={cache}", "quantizer.kind=rkmeans",
                    f"quantizer.levels={levels}", "quantizer.codes=32", *extra)
        t = time.perf_counter()
        wait_all({folder: run_logged(cmd, root / "logs" / f"{folder}.log")})
        print(f"{folder}: {time.perf_counter() - t:.0f} s", flush=True)


def stage_train(args, extra) -> None:
    root = Path(args.root)
    procs = {}
    for name in args.runs:
        out = root / "runs" / name
        if (out / "checkpoints" / "last" / "state.json").is_file():
            # the trainer resumes from its last checkpoint; with --epochs already reached it stops at once
            print(f"train {name}: resuming from {out / 'checkpoints' / 'last'}")
        ids = root / ("ids_item" if name.startswith("nodense") else "ids")
        cmd = cobra("train", "--data", str(root), "--ids", str(ids), "--out", str(out), "split=time", *MODEL, *RUNS[name],
                    f"epochs={args.epochs}", f"steps_per_epoch={args.steps}", f"max_minutes={args.minutes}",
                    f"eval_users={args.valid_users}", f"threads={args.threads}", "init_embeddings=true", *extra)
        procs[name] = run_logged(cmd, root / "logs" / f"train_{name}.log", args.threads)
        if not args.parallel:
            wait_all({name: procs.pop(name)})
    wait_all(procs)


def stage_index(args, extra) -> None:
    root = Path(args.root)
    for name in args.runs:
        if name.startswith("nodense"):
            continue  # w/o Dense decodes items directly (its 4th code), no vectors to index
        out = root / "runs" / name / "index"
        if (out / "index.json").is_file():
            print(f"index {name}: ready ({out})")
            continue
        cmd = cobra("index", "--run", str(root / "runs" / name), "--out", str(out), "--shards", str(args.shards), f"max_per_id={MAX_PER_ID}", *extra)
        wait_all({name: run_logged(cmd, root / "logs" / f"index_{name}.log", args.threads)})


def stage_eval(args, extra) -> None:
    root = Path(args.root)
    for name in args.runs:
        run = root / "runs" / name
        out = run / "eval_recall"
        if (out / "eval_test.json").is_file():
            print(f"eval {name}: done ({out})")
            continue
        index = ["--index", str(run / "index")] if not name.startswith("nodense") else []
        users = args.sparse_users if name.startswith("nodense") else args.users
        cmd = cobra("eval", "--run", str(run), *index, "--out", str(out), "--split", "time", "--split-name", "test",
                    "--max-users", str(users), "--valid-users", str(args.valid_users), "--workers", str(args.workers),
                    "--worker-cpus", "1", "--exclude-history", f"ks={KS}", *EVAL[name], *extra)
        wait_all({name: run_logged(cmd, root / "logs" / f"eval_{name}.log")})


def _cell(metrics: dict, ci: dict, key: str) -> str:
    if key not in metrics:
        return "—"
    return f"{metrics[key]:.4f}" + (f" ± {ci[key]:.4f}" if key in ci else "")


def stage_table(args, extra) -> None:
    root = Path(args.root)
    rows, meta = [], {}
    for name in RUNS:
        path = root / "runs" / name / "eval_recall" / "eval_test.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        meta[name] = {k: result.get(k) for k in ("users", "population", "wall_minutes", "ks", "passes")}
        for mode, r in result["modes"].items():
            for history, key, ci in (("kept", "history_not_masked", "ci"), ("masked", "history_masked", "ci_masked")):
                if key in r:
                    rows.append({"model": LABEL.get(mode, mode), "run": name, "history": history, "metrics": r[key],
                                 "ci": r.get(ci, {}), "chosen_on_valid": r.get("chosen_on_valid")})
    if not rows:
        raise SystemExit(f"no eval results under {root}/runs/*/eval_recall")
    ks = [50, 100, 200, 500, 800]
    head = "| model | run | history | " + " | ".join(f"R@{k}" for k in ks) + " | N@50 | N@800 | D@800 |"
    lines = [head, "|---" * (len(ks) + 6) + "|"]
    for r in rows:
        m, ci = r["metrics"], r["ci"]
        lines.append(f"| {r['model']} | {r['run']} | {r['history']} | " + " | ".join(_cell(m, ci, f"recall@{k}") for k in ks)
                     + f" | {_cell(m, ci, 'ndcg@50')} | {_cell(m, ci, 'ndcg@800')} | {m.get('diversity@800', float('nan')):.1f} |")
    table = "\n".join(lines)
    print(table)
    (root / "recall_table.md").write_text(table + "\n")
    (root / "recall_table.json").write_text(json.dumps({"rows": rows, "runs": meta}, indent=2))


def stage_lines(args, extra) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    root = Path(args.root)
    truth = pq.read_table(root / "raw" / "truth" / "items_truth.parquet")
    if "line" not in truth.column_names:
        raise SystemExit(f"{root}: the logs have no product lines (made without line_size)")
    item = truth.column("item_id").to_numpy()
    groups = {"line": truth.column("line").to_numpy(), "topic": truth.column("topic").to_numpy()}
    report = {}
    for folder in ("ids", "ids_item"):
        path = root / folder / "sids.parquet"
        if not path.is_file():
            continue
        sids = pq.read_table(path)
        order = np.argsort(sids.column("item_id").to_numpy())
        pos = order[np.searchsorted(sids.column("item_id").to_numpy(), item, sorter=order)]
        codes = np.stack([sids.column(c).to_numpy()[pos] for c in sids.column_names if c.startswith("code_")], axis=1)
        prefix, base = np.zeros(len(item), dtype=np.int64), int(codes.max()) + 1
        for level in range(codes.shape[1]):
            prefix = prefix * base + codes[:, level]
            row = {}
            for name, g in groups.items():
                pairs = np.unique(np.stack([g, prefix], axis=1), axis=0, return_counts=True)
                top = np.zeros(g.max() + 1, dtype=np.int64)
                np.maximum.at(top, pairs[0][:, 0], pairs[1])
                row[f"{name}_share"] = round(float(np.mean(top[g] / np.bincount(g)[g])), 3)
            row["distinct"] = int(len(np.unique(prefix)))
            report[f"{folder} level {level + 1}"] = row
            print(f"{folder} level {level + 1}: {row}", flush=True)
    (root / "lines_report.json").write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["data", "ids", "train", "index", "eval", "table", "lines"])
    p.add_argument("--root", required=True, help="benchmark folder (data, ids, runs, logs)")
    p.add_argument("--users", type=int, default=None, help="data: users to generate (default 1M); eval: test users sampled (default 20k)")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=["full", "noid", "nodense"], choices=list(RUNS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=150, help="train: steps per (capped) epoch")
    p.add_argument("--minutes", type=float, default=60.0, help="train: budget per run")
    p.add_argument("--valid-users", type=int, default=2000)
    p.add_argument("--sparse-users", type=int, default=2000, help="eval: test users sampled for w/o Dense (800 beams per user)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True, help="train: the runs side by side")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="eval: Ray Data actors")
    args = p.parse_args(argv)
    if args.users is None:
        args.users = 20_000 if args.stage == "eval" else 1_000_000
    stage = {"data": stage_data, "ids": stage_ids, "train": stage_train, "index": stage_index, "eval": stage_eval, "table": stage_table, "lines": stage_lines}
    stage[args.stage](args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
