"""How often a run recommends the user's own history, against how often the data repeats it.

For a seeded sample of test users (history -> held-out target) and of training prefixes
(a random cut of a training sequence -> its next item), with the run's inference settings
and the history kept in the ranking (the papers' protocol), it counts:

* ``top1_is_history``: the first recommendation is one of the user's history items;
* ``history_in_top10``: history items among the first 10 (mean);
* ``top_beam_is_history_id``: the most likely sparse ID is the ID of a history item;
* ``target_id_is_history_id``: the target shares its sparse ID with a history item (how
  often the data repeats an ID; on Amazon Beauty an item never repeats);
* ``hit@10``: the target is among the first 10.

    python tools/diagnose_repeats.py --run runs/s16_idb --tau 1 --psi 40 --users 3000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.errors import CobraError  # noqa: E402
from cobra_scale.model.beam import beam_search  # noqa: E402
from cobra_scale.retrieve.recommender import InferenceParams  # noqa: E402
from cobra_scale.train.data import load_examples, read_sequences  # noqa: E402
from cobra_scale.train.trainer import load_run, make_recommender  # noqa: E402


def training_prefixes(seqs: list[np.ndarray], n: int, max_history: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` random (prefix -> next item) cuts of training sequences with >= 2 items: (history (n, S), targets (n,))."""
    rng = np.random.default_rng(seed)
    usable = [s for s in seqs if len(s) >= 2]
    pick = rng.choice(len(usable), min(n, len(usable)), replace=False)
    history = torch.full((len(pick), max_history), -1, dtype=torch.long)
    targets = np.zeros(len(pick), dtype=np.int64)
    for row, i in enumerate(pick):
        s = usable[i]
        t = int(rng.integers(1, len(s)))
        h = s[:t][-max_history:]
        history[row, max_history - len(h):] = torch.from_numpy(np.asarray(h, dtype=np.int64))
        targets[row] = s[t]
    return history, targets


def repeat_stats(rec, history: torch.Tensor, targets: np.ndarray, params: InferenceParams, batch: int = 250) -> dict[str, float]:
    sums = dict.fromkeys(("top1_is_history", "history_in_top10", "top_beam_is_history_id", "target_id_is_history_id", "hit@10"), 0.0)
    for start in range(0, len(targets), batch):
        h = history[start : start + batch]
        t = torch.from_numpy(targets[start : start + batch])
        items, _ = rec.recommend(h, 10, params)
        in_hist = (items[:, :, None] == h[:, None, :]).any(-1) & (items >= 0)
        sums["top1_is_history"] += float(in_hist[:, 0].sum())
        sums["history_in_top10"] += float(in_hist.sum())
        sums["hit@10"] += float((items == t[:, None]).any(1).sum())
        codes, vectors, valid = rec._history_inputs(h)
        beams = beam_search(rec.model, codes, vectors, valid, rec.masks, params.beams, with_dense=False, last_items=h)
        hist_sids = rec.sids[h.clamp(min=0)].masked_fill(h < 0, -1)
        sums["top_beam_is_history_id"] += float((beams.sids[:, :1] == hist_sids).any(-1).sum())
        sums["target_id_is_history_id"] += float((rec.sids[t][:, None] == hist_sids).any(-1).sum())
    return {k: round(v / max(len(targets), 1), 4) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `cobra train` run folder (full model)")
    ap.add_argument("--tau", type=float, default=None, help="BeamFusion tau (default: the run's)")
    ap.add_argument("--psi", type=float, default=None, help="BeamFusion psi (default: the run's)")
    ap.add_argument("--beams", type=int, default=None, help="beams (default: the run's)")
    ap.add_argument("--users", type=int, default=3000, help="test users and training prefixes sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results JSON (default: <run>/repeats.json)")
    args = ap.parse_args(argv)
    if args.users < 1 or (args.beams is not None and args.beams < 1):
        ap.error("--users and --beams must be >= 1")
    t0 = time.perf_counter()
    try:
        model, catalogue, cfg, device = load_run(args.run)
    except CobraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (model.cfg.use_sparse and model.cfg.use_dense):
        print("error: the run must be a full model (sparse IDs and dense vectors)", file=sys.stderr)
        return 2
    inf = cfg.inference
    params = InferenceParams("cobra", args.beams or inf.beams, args.tau if args.tau is not None else inf.tau,
                             args.psi if args.psi is not None else inf.psi, inf.normalize, False)
    rec = make_recommender(model, catalogue, device, inf.max_per_id)  # the run's cap on candidates per ID
    split = Path(cfg.data) / "splits" / cfg.split
    hist_len = cfg.model.max_items - 1
    test = load_examples(split / "test", catalogue, hist_len).sample(args.users, args.seed)
    first = np.array([t[0] for t in test.targets], dtype=np.int64)
    train_h, train_t = training_prefixes(read_sequences(split / "train", catalogue), args.users, hist_len, args.seed)
    with torch.no_grad():
        result = {"run": args.run, "params": {"tau": params.tau, "psi": params.psi, "beams": params.beams, "normalize": params.normalize},
                  "test_users": repeat_stats(rec, test.history, first, params),
                  "training_prefixes": repeat_stats(rec, train_h, train_t, params),
                  "users": len(first), "prefixes": len(train_t)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) if args.out else Path(args.run) / "repeats.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("test_users", "training_prefixes"):
        print(f"{name:18} " + "  ".join(f"{k} {v:.4f}" for k, v in result[name].items()))
    print(f"wrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
