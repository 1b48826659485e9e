"""How much of an item-to-item transition count a trained COBRA run already holds.

An analysis, not the paper's model: it mixes two rankings of the same users,

    p(item) = (1 - lam) * p_cobra(item) + lam * p_count(item)

where ``p_cobra`` is the run's BeamFusion score (with per-beam normalisation the scores
of all candidates sum to 1, so they are a distribution; items outside the top
``--candidates`` get 0) and ``p_count`` is the transition count of
``tools/baseline_transitions.py`` (window 3, forward, decay 0.3: that tool's choice on
Beauty's validation rows) normalised over the catalogue. ``lam`` is chosen on a seeded
sample of validation users by NDCG@10 with history kept (the papers' protocol); the test
figures of that choice are printed for history kept and masked, with 95 % CIs over users.
``lam = 0`` is COBRA alone and ``lam = 1`` the count alone, so the grid also re-measures both.

If the mixture is far ahead of both, the two carry different signal; if it is level with
the count, COBRA's ranking adds nothing the count lacks.

    python tools/fuse_transitions.py --run runs/s16_ieb3 --tau 1 --psi 40 --valid-users 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_transitions import history_scores, transition_matrix  # noqa: E402

from cobra_scale.errors import CobraError  # noqa: E402
from cobra_scale.eval.metrics import UserMeans, topk_with_exclusion, user_metrics  # noqa: E402
from cobra_scale.retrieve.recommender import InferenceParams  # noqa: E402
from cobra_scale.train.data import load_examples, read_sequences  # noqa: E402
from cobra_scale.train.trainer import load_run, make_recommender  # noqa: E402

KS = (5, 10)


def summary(m: UserMeans) -> dict[str, float]:
    """Means with their 95 % half-widths (``<name>_ci95``)."""
    return {**m.mean(), **{f"{k}_ci95": v for k, v in m.half_width().items()}}


def count_scores(matrix: sp.csr_matrix, history: np.ndarray, context: int, decay: float) -> torch.Tensor:
    """(B, n) transition scores out of each row's last ``context`` items (catalogue indices,
    -1 padding; ``matrix`` indexed by catalogue index + 1), normalised to sum 1 (0 rows stay 0)."""
    s = torch.from_numpy(history_scores(matrix, history + 1, context, decay))
    return s / s.sum(1, keepdim=True).clamp(min=1e-12)


def cobra_scores(rec, history: torch.Tensor, n: int, candidates: int, params: InferenceParams) -> torch.Tensor:
    """(B, n) BeamFusion scores of the top ``candidates`` items (0 elsewhere)."""
    items, scores = rec.recommend(history, candidates, params)
    out = torch.zeros(history.shape[0], n)
    ok = items >= 0
    out[torch.nonzero(ok, as_tuple=True)[0], items[ok]] = scores[ok].float()
    return out


def score_users(rec, examples, matrix, lams, params, args, pop_tie: torch.Tensor, desc: str) -> dict:
    """{lam: {"kept": metrics, "masked": metrics}} over ``examples``."""
    n = len(pop_tie)
    means = {(lam, how): UserMeans() for lam in lams for how in ("kept", "masked")}
    cov = UserMeans()
    for start in tqdm(range(0, len(examples.targets), args.batch_users), desc=desc, unit="batch"):
        h = examples.history[start : start + args.batch_users]
        targets = examples.targets[start : start + args.batch_users]
        pc = cobra_scores(rec, h, n, args.candidates, params)
        pt = count_scores(matrix, h.numpy(), args.context, args.decay)
        first = np.array([t[0] for t in targets])
        cov.update({"target_in_cobra_candidates": (pc[torch.arange(len(first)), torch.from_numpy(first)] > 0).numpy().astype(float)},
                   np.ones(len(first), bool))
        for lam in lams:
            mixed = (1 - lam) * pc + lam * pt + pop_tie  # popularity only breaks ties
            for how in ("kept", "masked"):
                top = topk_with_exclusion(mixed.clone(), max(KS), h if how == "masked" else None, inplace=True)
                values, has = user_metrics(top.numpy(), targets, KS)
                means[(lam, how)].update(values, has)
    out: dict = {"target_in_cobra_candidates": summary(cov)}
    for (lam, how), m in means.items():
        out.setdefault(str(lam), {})[how] = summary(m)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `cobra train` run folder")
    ap.add_argument("--tau", type=float, required=True, help="BeamFusion tau (the run's choice on validation)")
    ap.add_argument("--psi", type=float, required=True, help="BeamFusion psi (the run's choice on validation)")
    ap.add_argument("--normalize", default="per_beam", choices=["per_beam", "global"])
    ap.add_argument("--beams", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=100, help="COBRA's top items that enter the mixture")
    ap.add_argument("--lams", default="0,0.1,0.2,0.3,0.5,0.7,0.9,1", help="mixture weights of the count (comma list in [0, 1])")
    ap.add_argument("--valid-users", type=int, default=5000, help="seeded validation sample that chooses lam (0 = all)")
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--decay", type=float, default=0.3)
    ap.add_argument("--context", type=int, default=3)
    ap.add_argument("--batch-users", type=int, default=256)
    ap.add_argument("--out", help="results JSON (default: <run>/fuse_transitions.json)")
    args = ap.parse_args(argv)
    try:
        lams = [float(x) for x in args.lams.split(",")]
    except ValueError:
        ap.error("--lams must be a comma list of numbers")
    if not lams or any(not 0 <= lam <= 1 for lam in lams):
        ap.error("--lams must lie in [0, 1]")
    if args.candidates < max(KS) or args.window < 1 or args.context < 1 or args.beams < 1:
        ap.error("--candidates must be >= 10 and --window, --context, --beams >= 1")
    t0 = time.perf_counter()
    try:
        model, catalogue, cfg, device = load_run(args.run)
    except CobraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = Path(cfg.data) / "splits" / cfg.split
    seqs = read_sequences(split / "train", catalogue)
    n = len(catalogue)
    values = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    matrix = transition_matrix(values + 1, offsets, n, args.window, False, False)  # index 0 = padding
    pop = np.bincount(values, minlength=n).astype(np.float32)
    pop_tie = torch.from_numpy(pop / (pop.max() + 1.0) * 1e-6)
    rec = make_recommender(model, catalogue, device, cfg.inference.max_per_id)  # the run's cap on candidates per ID
    params = InferenceParams("cobra", args.beams, args.tau, args.psi, args.normalize, False)
    hist_len = cfg.model.max_items - 1
    valid = load_examples(split / "valid", catalogue, hist_len).sample(args.valid_users, cfg.seed)
    with torch.no_grad():
        v = score_users(rec, valid, matrix, lams, params, args, pop_tie, "valid")
        best = max(lams, key=lambda lam: v[str(lam)]["kept"]["ndcg@10"])
        test = load_examples(split / "test", catalogue, hist_len)
        t = score_users(rec, test, matrix, sorted({0.0, best, 1.0}), params, args, pop_tie, "test")
    result = {"run": args.run, "params": vars(args), "chosen_lam": best, "valid_users": len(valid.targets), "test_users": len(test.targets),
              "valid": v, "test": t, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out) if args.out else Path(args.run) / "fuse_transitions.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("valid N@10 (kept) by lam:", {lam: round(v[str(lam)]["kept"]["ndcg@10"], 4) for lam in lams})
    print(f"chosen lam {best}; test (all {len(test.targets)} users), target among COBRA's {args.candidates} candidates: "
          f"{t['target_in_cobra_candidates']['target_in_cobra_candidates']:.4f}")
    for lam in sorted({0.0, best, 1.0}):
        for how in ("kept", "masked"):
            r = t[str(lam)][how]
            print(f"  lam {lam:<4} {how:6} " + "  ".join(f"{k} {r[k]:.4f}" + (f" ± {r[k + '_ci95']:.4f}" if k + "_ci95" in r else "")
                                                          for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")))
    print(f"wrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
