"""Item-to-item transitions: a count baseline for leave-one-out splits (no training).

Counts, over the training sequences, how often item b follows item a within ``window``
positions (optionally also precedes it). A user's scores are the counts out of their last
``context`` history items, the most recent weighted 1, the one before ``decay``, then
``decay**2``...; popularity in the training split breaks ties and fills short lists. The
setting (window, both directions, decay, row normalisation) is chosen on the validation
rows by NDCG at the largest K (history kept, the papers' protocol) and its test figures are reported
with the user's history kept and masked. Full ranking over the catalogue, one target per
row: the metrics of ``cobra eval`` and ``cobra baseline sasrec``.

It measures how much of a dataset is plain item-to-item co-occurrence, which is what
SASRec's free item embeddings capture and a sparse ID shared by several items blurs.

    python tools/baseline_transitions.py --data data/beauty --out runs/transitions_beauty
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.baselines.sasrec import Catalogue, _list_column, load_eval_set  # noqa: E402
from cobra_scale.data.io import read_table  # noqa: E402
from cobra_scale.errors import CobraError  # noqa: E402
from cobra_scale.eval.metrics import MetricAccumulator, topk_with_exclusion  # noqa: E402
from cobra_scale.retrieve.prior import history_scores, transition_matrix  # noqa: E402,F401  (tools/fuse_transitions.py imports them from here)


def score_and_rank(matrix: sp.csr_matrix, histories: torch.Tensor, targets: list, item_ids: np.ndarray, pop: np.ndarray,
                   context: int, decay: float, ks: list[int], batch: int = 2048) -> dict[str, dict[str, float]]:
    """Metrics of ranking by transitions out of each row's last ``context`` items."""
    kmax = max(ks)
    accs = {"kept": MetricAccumulator(ks), "masked": MetricAccumulator(ks)}
    tie = torch.from_numpy(pop[1:] / (pop.max() + 1.0) * 1e-3).float()  # < any count, > nothing
    hist = histories.numpy()
    for start in range(0, len(hist), batch):
        scores = torch.from_numpy(history_scores(matrix, hist[start : start + batch], context, decay)) + tie
        tg = targets[start : start + batch]
        accs["kept"].update(item_ids[topk_with_exclusion(scores, kmax).numpy()], tg)
        full = torch.from_numpy(hist[start : start + batch])
        accs["masked"].update(item_ids[topk_with_exclusion(scores, kmax, full - 1, inplace=True).numpy()], tg)
    return {name: acc.result() for name, acc in accs.items()}


def run(data: Path, split: str, out: Path | None, windows: list[int], decays: list[float], context: int, ks: list[int]) -> dict:
    t0 = time.perf_counter()
    root = data / "splits" / split
    catalogue = Catalogue(read_table(data / "items.parquet", columns=["item_id"]).column("item_id").to_numpy())
    values, offsets = _list_column(read_table(root / "train", columns=["item_ids"]), "item_ids")
    values = catalogue.to_index(values, f"{root / 'train'} item_ids")
    n = len(catalogue)
    pop = np.bincount(values, minlength=n + 1).astype(np.float64)
    valid = load_eval_set(root / "valid", catalogue, 20)
    test = load_eval_set(root / "test", catalogue, 20)
    @functools.cache  # one matrix per (window, both, normalise), shared by the decays, the test pass and the stats
    def matrix(window: int, both: bool, norm: bool) -> sp.csr_matrix:
        return transition_matrix(values, offsets, n, window, both, norm)

    grid = []
    cells = list(itertools.product(windows, (False, True), (False, True), decays))
    for window, both, norm, decay in tqdm(cells, desc="valid grid", unit="setting"):
        res = score_and_rank(matrix(window, both, norm), valid.histories, valid.targets, catalogue.item_ids, pop, context, decay, ks)
        grid.append({"window": window, "both_directions": both, "normalise": norm, "decay": decay, "valid": res})
    select = f"ndcg@{max(ks)}"
    best = max(grid, key=lambda g: g["valid"]["kept"][select])
    test_res = score_and_rank(matrix(best["window"], best["both_directions"], best["normalise"]), test.histories, test.targets, catalogue.item_ids, pop, context, best["decay"], ks)
    # what makes valid easier than test: popularity alone, and how often the target follows the last item in training
    empty = sp.csr_matrix((n + 1, n + 1), dtype=np.float32)
    nxt = matrix(1, False, False)
    data_stats = {}
    for name, ev in (("valid", valid), ("test", test)):
        tgt_idx = np.array(catalogue.to_index(np.array([t[0] for t in ev.targets]), name), dtype=np.int64)
        last = np.array(ev.histories[:, -1].numpy(), dtype=np.int64)  # a writeable copy for scipy indexing
        data_stats[name] = {
            "popularity": score_and_rank(empty, ev.histories, ev.targets, catalogue.item_ids, pop, context, 1.0, ks)["kept"],
            "target_train_count_median": float(np.median(pop[tgt_idx])),
            "target_follows_last_item_in_train": float(np.mean(np.asarray(nxt[last, tgt_idx]).ravel() > 0)),
        }
    result = {"model": "item-to-item transitions", "data_stats": data_stats, "data": str(data), "split": split, "context": context, "select_metric": f"valid kept {select}",
              "chosen": {k: best[k] for k in ("window", "both_directions", "normalise", "decay")},
              "valid": best["valid"], "test": test_res, "grid": grid, "wall_s": round(time.perf_counter() - t0, 1)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/beauty"), help="dataset folder: items.parquet, splits/<split>/")
    p.add_argument("--split", default="loo")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json (default: print only)")
    p.add_argument("--windows", default="1,2,3", help="comma-separated look-ahead windows for the grid")
    p.add_argument("--decays", default="0.3,0.6,1.0", help="comma-separated recency decays for the grid")
    p.add_argument("--context", type=int, default=3, help="last history items that vote")
    args = p.parse_args(argv)
    try:
        windows = [int(x) for x in args.windows.split(",")]
        decays = [float(x) for x in args.decays.split(",")]
        if not windows or min(windows) < 1 or args.context < 1 or any(not 0 < d <= 1 for d in decays):
            raise ValueError
    except ValueError:
        print("error: --windows must be integers >= 1, --decays in (0, 1], --context >= 1", file=sys.stderr)
        return 2
    try:
        res = run(args.data, args.split, args.out, windows, decays, args.context, [5, 10])
    except (CobraError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = lambda m: " ".join(f"{k} {v:.4f}" for k, v in m.items())  # noqa: E731
    print(f"chosen on {res['select_metric']}: {res['chosen']}")
    print(f"valid (kept):  {fmt(res['valid']['kept'])}")
    print(f"test (kept):   {fmt(res['test']['kept'])}")
    print(f"test (masked): {fmt(res['test']['masked'])}")
    for name, st in res["data_stats"].items():
        print(f"{name}: popularity {fmt(st['popularity'])}; target's training count median {st['target_train_count_median']:.0f}; "
              f"target follows the last history item in training {st['target_follows_last_item_in_train']:.4f}")
    print(f"wall {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
