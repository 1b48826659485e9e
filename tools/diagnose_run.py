"""Where a COBRA run loses its recall: code prediction, beam search, or the dense step.

For a seeded sample of validation (or test) users of a trained run it prints:

* the teacher-forced cross-entropy of the targets' codes per level (compare with the
  training loss: a large gap is over-fitting),
* ID-hit@M: how often the target's full sparse ID is among the M beams,
* item recall@K of the inference modes on the same users.

    python tools/diagnose_run.py --run runs/beauty --users 1000 --beams 10,20,50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.eval.offline import evaluate  # noqa: E402
from cobra_scale.model.beam import beam_search  # noqa: E402
from cobra_scale.retrieve.recommender import InferenceParams  # noqa: E402
from cobra_scale.train.data import load_examples  # noqa: E402
from cobra_scale.train.trainer import load_run, make_recommender  # noqa: E402


@torch.no_grad()
def code_cross_entropy(rec, history: torch.Tensor, targets: np.ndarray) -> list[float]:
    """Mean CE per level of the target codes given the history, teacher forced (one pass per level)."""
    model, K = rec.model, rec.model.cfg.codes
    codes, vectors, valid = rec._history_inputs(history)
    tcodes = rec.codes[torch.from_numpy(targets)]  # (B, L)
    h, cache, pos = model.start(codes, vectors, valid)
    out, prefix = [], torch.zeros(len(targets), dtype=torch.long)
    for level in range(tcodes.shape[1]):
        if level:
            h, cache = model.step_code(cache, level - 1, tcodes[:, level - 1], pos, prefix // K if level > 1 else None)
        out.append(float(F.cross_entropy(model.code_logits(h, level, prefix if level else None).float(), tcodes[:, level])))
        prefix = prefix * K + tcodes[:, level]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split-name", default="valid")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--beams", default="10,20,50")
    ap.add_argument("--modes", default="cobra,no_fusion")
    ap.add_argument("--grid-tau", default="", help="also score cobra at these tau values (comma list) x --grid-psi")
    ap.add_argument("--grid-psi", default="")
    args = ap.parse_args(argv)
    model, catalogue, cfg, device = load_run(args.run, "cpu")
    split = Path(cfg.data) / "splits" / cfg.split / args.split_name
    users = load_examples(split, catalogue, cfg.model.max_items - 1).sample(args.users, 0)
    rec = make_recommender(model, catalogue, device)
    first = np.array([t[0] for t in users.targets])
    result = {"run": args.run, "users": len(first)}
    if model.cfg.use_sparse:
        ce = []
        for s in range(0, len(first), 256):
            ce.append(code_cross_entropy(rec, users.history[s : s + 256], first[s : s + 256]))
        result["code_ce_per_level"] = [round(float(x), 3) for x in np.mean(ce, axis=0)]
        tsid = rec.sids[torch.from_numpy(first)]
        for m in (int(x) for x in args.beams.split(",")):
            hits = 0
            for s in range(0, len(first), 256):
                codes, vectors, valid = rec._history_inputs(users.history[s : s + 256])
                beams = beam_search(model, codes, vectors, valid, rec.masks, m, with_dense=False)
                hits += int((beams.sids == tsid[s : s + 256, None]).any(1).sum())
            result[f"id_hit@{m}"] = round(hits / len(first), 4)
    for mode in args.modes.split(","):
        p = InferenceParams(mode=mode, beams=cfg.inference.beams, tau=cfg.inference.tau, psi=cfg.inference.psi)
        result[mode] = {k: round(v, 4) for k, v in evaluate(rec, users.history, users.targets, p, progress=False).items()}
    taus = [float(x) for x in args.grid_tau.split(",") if x] or [cfg.inference.tau]
    psis = [float(x) for x in args.grid_psi.split(",") if x] or [cfg.inference.psi]
    if args.grid_tau or args.grid_psi:
        result["cobra_grid"] = {}
        for tau in taus:
            for psi in psis:
                p = InferenceParams(mode="cobra", beams=cfg.inference.beams, tau=tau, psi=psi)
                r = evaluate(rec, users.history, users.targets, p, progress=False)
                result["cobra_grid"][f"tau={tau:g},psi={psi:g}"] = {k: round(v, 4) for k, v in r.items() if k.endswith("@10")}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
