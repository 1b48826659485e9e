"""``cobra eval``: evaluate a trained run with the papers' protocol.

Inference settings (tau, psi, beams) are chosen on the **validation** targets only (a grid
over the values given), then the chosen setting is evaluated on the requested split. Each
mode is reported without and, if asked, with the user's history items masked from the
ranking (the papers' protocol does not mask).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cobra_scale.errors import ConfigError
from cobra_scale.train.configs import EvalConfig

log = logging.getLogger(__name__)


def run(cfg: EvalConfig) -> dict:
    from cobra_scale.eval.offline import evaluate
    from cobra_scale.train.data import load_examples
    from cobra_scale.train.trainer import inference_params, load_run, make_recommender

    started = time.perf_counter()
    model, catalogue, tcfg, device = load_run(cfg.run)
    split = Path(tcfg.data) / "splits" / tcfg.split
    max_hist = tcfg.model.max_items - 1
    valid = load_examples(split / "valid", catalogue, max_hist).sample(cfg.max_users)
    target = valid if cfg.split_name == "valid" else load_examples(split / cfg.split_name, catalogue, max_hist).sample(cfg.max_users)
    rec = make_recommender(model, catalogue, device)
    base = inference_params(tcfg.inference)
    modes = list(cfg.modes)
    bad = [m for m in modes if m not in ("cobra", "no_fusion", "dense_only", "sparse_only")]
    if bad:
        raise ConfigError(f"unknown mode(s) {bad}")
    taus = [float(t) for t in cfg.grid_tau] or [base.tau]
    psis = [float(p) for p in cfg.grid_psi] or [base.psi]
    beam_counts = [int(b) for b in cfg.grid_beams] or [base.beams]
    results: dict = {"run": str(cfg.run), "split": cfg.split_name, "users": len(target.targets), "sampled": bool(cfg.max_users), "modes": {}}
    for mode in modes:
        grid = list(itertools.product(taus, psis, beam_counts)) if mode == "cobra" else [(base.tau, base.psi, base.beams)]
        best, best_params = None, None
        selection = []
        for tau, psi, beams in grid:
            p = replace(base, mode=mode, tau=tau, psi=psi, beams=beams)
            if len(grid) > 1:
                m = evaluate(rec, valid.history, valid.targets, p, batch_users=cfg.batch_users, device=device)
                selection.append({"tau": tau, "psi": psi, "beams": beams, **m})
                log.info("valid %s tau=%s psi=%s beams=%s: %s", mode, tau, psi, beams, {k: round(v, 4) for k, v in m.items()})
                if best is None or m["ndcg@10"] > best:
                    best, best_params = m["ndcg@10"], p
            else:
                best_params = p
        entry = {"chosen_on_valid": {"tau": best_params.tau, "psi": best_params.psi, "beams": best_params.beams}}
        if selection:
            entry["valid_grid"] = selection
        entry["history_not_masked"] = evaluate(rec, target.history, target.targets, best_params, batch_users=cfg.batch_users, device=device)
        if cfg.exclude_history:
            entry["history_masked"] = evaluate(rec, target.history, target.targets, replace(best_params, exclude_history=True), batch_users=cfg.batch_users, device=device)
        results["modes"][mode] = entry
        log.info("%s %s: %s", cfg.split_name, mode, {k: round(v, 4) for k, v in entry["history_not_masked"].items()})
    results["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    out = Path(cfg.out or cfg.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_{cfg.split_name}.json").write_text(json.dumps(results, indent=2))
    summary = {}
    for mode, entry in results["modes"].items():
        for k, v in entry["history_not_masked"].items():
            summary[f"{mode} {k}"] = round(v, 4)
        for k, v in entry.get("history_masked", {}).items():
            summary[f"{mode} {k} (history masked)"] = round(v, 4)
    summary["out"] = str(out / f"eval_{cfg.split_name}.json")
    return summary
