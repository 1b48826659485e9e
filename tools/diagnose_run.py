"""Where a COBRA run loses its recall: code prediction, beam search, or the dense step.

For a seeded sample of validation (or test) users of a trained run it prints:

* the teacher-forced cross-entropy of the targets' codes per level (compare with the
  training loss: a large gap is over-fitting),
* ID-hit@M: how often the target's full sparse ID is among the M beams,
* inside the target's ID when it is among the M beams: the ID's size and how often the
  dense vector predicted for that ID ranks the target first among the ID's items,
* given the target's own ID (an oracle for the beams): the dense vector for that ID -- the
  ID-conditioned one of COBRA, or the one prediction of a w/o ID model -- and where it ranks
  the target among the ID's items (first, in the top 10, mean reciprocal rank); the same
  measure for both kinds of model, so their dense vectors compare inside the same IDs,
* item recall@K of the inference modes on the same users (and of a tau x psi x
  normalisation grid of BeamFusion).

    python tools/diagnose_run.py --run runs/beauty --users 1000 --beams 10,20,50 \
        --grid-tau 1,2 --grid-psi 20,40 --grid-normalize per_beam,global
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
        out.append(float(F.cross_entropy(model.code_logits(model.with_successor(h, history), level, prefix if level else None).float(), tcodes[:, level])))
        prefix = prefix * K + tcodes[:, level]
    return out


@torch.no_grad()
def oracle_vectors(rec, history: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    """The dense vector predicted for the target's own ID (teacher forced); w/o ID: the model's one prediction."""
    model, K = rec.model, rec.model.cfg.codes
    codes, vectors, valid = rec._history_inputs(history)
    h, cache, pos = model.start(codes, vectors, valid)
    if not model.cfg.use_sparse:
        return model.dense_prediction(model.with_successor(h, history, dense=True))
    tcodes = rec.codes[torch.from_numpy(targets)]
    prefix = torch.zeros(len(targets), dtype=torch.long)
    for level in range(tcodes.shape[1]):
        h, cache = model.step_code(cache, level, tcodes[:, level], pos, prefix if level else None)
        prefix = prefix * K + tcodes[:, level]
    return model.dense_prediction(model.with_successor(h, history, dense=True))


def in_own_id(rec, history: torch.Tensor, targets: np.ndarray, batch: int = 256) -> dict:
    """Rank of the target among the items of its own ID under the vector of :func:`oracle_vectors`."""
    ranks, sizes = [], []
    for s in range(0, len(targets), batch):
        t = targets[s : s + batch]
        q = oracle_vectors(rec, history[s : s + batch], t)
        cand, _ = rec.index.search_in_ids(q, rec.sids[torch.from_numpy(t)])
        hit = cand == torch.from_numpy(t)[:, None]
        # a target outside the ID's best max_per_id has no rank (reciprocal rank 0)
        ranks += torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.zeros(len(t), dtype=torch.long)).tolist()
        sizes += (cand >= 0).sum(1).tolist()
    r = np.asarray(ranks)
    return {
        "mean_items": round(float(np.mean(sizes)), 1),
        "target_first": round(float(np.mean(r == 1)), 4),
        "target_top10": round(float(np.mean((r >= 1) & (r <= 10))), 4),
        "mrr": round(float(np.mean(np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0))), 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split-name", default="valid")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--beams", default="10,20,50")
    ap.add_argument("--modes", default="", help="inference modes to score (default: cobra,no_fusion; dense_only for a w/o ID run)")
    ap.add_argument("--grid-tau", default="", help="also score cobra at these tau values (comma list) x --grid-psi")
    ap.add_argument("--grid-psi", default="")
    ap.add_argument("--grid-normalize", default="", help="BeamFusion normalisations of the grid: per_beam,global")
    ap.add_argument("--grid-beams", type=int, default=0, help="beams M of the grid (default: the run's)")
    args = ap.parse_args(argv)
    model, catalogue, cfg, device = load_run(args.run, "cpu")
    modes = [m for m in args.modes.split(",") if m] or (["cobra", "no_fusion"] if model.cfg.use_sparse else ["dense_only"])
    beam_modes = {"cobra", "no_fusion", "sparse_only", "liger"}
    if not model.cfg.use_sparse and beam_modes & set(modes):
        ap.error(f"{args.run} was trained without sparse IDs (w/o ID): use --modes dense_only")
    split = Path(cfg.data) / "splits" / cfg.split / args.split_name
    users = load_examples(split, catalogue, cfg.model.max_items - 1).sample(args.users, 0)
    rec = make_recommender(model, catalogue, device, cfg.inference.max_per_id)  # the run's cap on candidates per ID
    first = np.array([t[0] for t in users.targets])
    result = {"run": args.run, "users": len(first)}
    if model.cfg.use_dense and rec.index is not None:
        result["in_own_id"] = in_own_id(rec, users.history, first)
    if model.cfg.use_sparse:
        ce = []
        for s in range(0, len(first), 256):
            ce.append(code_cross_entropy(rec, users.history[s : s + 256], first[s : s + 256]))
        result["code_ce_per_level"] = [round(float(x), 3) for x in np.mean(ce, axis=0)]
        tsid = rec.sids[torch.from_numpy(first)]
        for m in (int(x) for x in args.beams.split(",")):
            hits, sizes, top1 = 0, [], []
            with_dense = model.cfg.use_dense
            for s in range(0, len(first), 256):
                codes, vectors, valid = rec._history_inputs(users.history[s : s + 256])
                beams = beam_search(model, codes, vectors, valid, rec.masks, m, with_dense=with_dense, last_items=users.history[s : s + 256])
                hit = beams.sids == tsid[s : s + 256, None]  # (B, M)
                hits += int(hit.any(1).sum())
                if with_dense:
                    rows, cols = hit.nonzero(as_tuple=True)
                    cand, cos = rec.index.search_in_ids(beams.dense[rows, cols], beams.sids[rows, cols])
                    target = torch.from_numpy(first[s : s + 256])[rows]
                    own = (cos.masked_fill(cand != target[:, None], float("-inf"))).max(1).values
                    sizes += (cand >= 0).sum(1).tolist()
                    top1 += (cos.max(1).values <= own).tolist()
            result[f"id_hit@{m}"] = round(hits / len(first), 4)
            if sizes:
                result[f"in_hit_id@{m}"] = {"mean_items": round(float(np.mean(sizes)), 2), "target_first": round(float(np.mean(top1)), 3)}
    for mode in modes:
        p = InferenceParams(mode=mode, beams=cfg.inference.beams, tau=cfg.inference.tau, psi=cfg.inference.psi, normalize=cfg.inference.normalize)
        result[mode] = {k: round(v, 4) for k, v in evaluate(rec, users.history, users.targets, p, progress=False).items()}
    taus = [float(x) for x in args.grid_tau.split(",") if x] or [cfg.inference.tau]
    psis = [float(x) for x in args.grid_psi.split(",") if x] or [cfg.inference.psi]
    norms = [x for x in args.grid_normalize.split(",") if x] or [cfg.inference.normalize]
    if args.grid_tau or args.grid_psi or args.grid_normalize:
        result["cobra_grid"] = {}
        for norm in norms:
            for tau in taus:
                for psi in psis:
                    p = InferenceParams(mode="cobra", beams=args.grid_beams or cfg.inference.beams, tau=tau, psi=psi, normalize=norm)
                    r = evaluate(rec, users.history, users.targets, p, progress=False)
                    result["cobra_grid"][f"{norm},tau={tau:g},psi={psi:g}"] = {k: round(v, 4) for k, v in r.items() if k.endswith("@10")}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
