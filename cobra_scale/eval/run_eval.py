"""``cobra eval``: evaluate a trained run with the papers' protocol, at any scale.

Inference settings (tau, psi, beams, normalisation) are chosen on the **validation** targets
only (a grid over the values given, for every mode they change: cobra all four, sparse_only and
liger the beams; a grid of one point is simply applied), then the chosen setting of every mode is evaluated on the
requested split — without and, if asked, with the user's history items masked from the
ranking (the papers' protocol does not mask) — in one pass over the users, together with
the optional τ sweep (recall–diversity curve, paper Fig. 6).

Scale: ``index=`` searches a `cobra index` folder (faiss IVF by sparse ID, item vectors
not re-encoded); ``workers=N`` scores users on a Ray Data actor pool (in-process Ray on
127.0.0.1 unless ``ray_address`` / ``$RAY_ADDRESS``); ``max_users=`` evaluates a uniform
sample, reported with its confidence interval. Any split folder works (``split=time``:
train days 1..D, test D+1; ``split=loo``).

Outputs (in ``out``, default the run folder): ``eval_<split_name>.json``, a Markdown table
``eval_<split_name>.md``, ``tau_sweep_<split_name>.png`` and, with ``plots=true``,
``embeddings_cosine.png`` (Fig. 4) and ``embeddings_map.png`` (Fig. 5).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cobra_scale.errors import ConfigError, DataError
from cobra_scale.train.configs import EvalConfig, check_free_query_head

log = logging.getLogger(__name__)

MODES = ("cobra", "no_fusion", "dense_only", "sparse_only", "liger")
# the inference parameters each mode's ranking depends on (no_fusion always takes 1 beam; dense_only none)
GRID_PARAMS = {"cobra": ("tau", "psi", "beams", "normalize", "prior_weight", "free_query_weight", "free_mix_weight"), "sparse_only": ("beams",), "liger": ("beams",)}


def run(cfg: EvalConfig) -> dict:
    from cobra_scale.eval.batch import Setting, diversity_sids, evaluate_local, evaluate_ray
    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.train.data import load_examples
    from cobra_scale.train.trainer import checkpoint_users, inference_params

    started = time.perf_counter()
    ks = tuple(sorted({int(k) for k in cfg.ks}))
    select_on = cfg.select_on or ("ndcg@10" if 10 in ks else f"ndcg@{ks[0]}")
    if select_on.split("@")[0] not in ("recall", "ndcg", "diversity") or not select_on.split("@")[-1].isdigit() or int(select_on.split("@")[-1]) not in ks:
        raise ConfigError(f"select_on must be recall|ndcg|diversity@K with K in ks={list(ks)}, got '{select_on}'")
    modes = list(cfg.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown mode(s) {bad}")
    # with Ray workers the driver only checks the run, samples users and draws the plots: the workers search, each on
    # cfg.device, so the driver's copy of the model and the index stays on the CPU (not a second copy on the GPU)
    driver_device, driver_index_device = ("cpu", "cpu") if cfg.workers > 0 else (cfg.device, cfg.index_device)
    rec, catalogue, tcfg, device = load_recommender(cfg.run, cfg.index, driver_device, driver_index_device)
    if cfg.diversity_ids:
        rec.diversity_sids = diversity_sids(cfg.diversity_ids, catalogue.item_ids)
    if "sparse_only" in modes and rec.sid_to_item is None:
        raise ConfigError("mode sparse_only needs a run trained w/o Dense on item-unique IDs (model.use_dense=false dedup_level=true)")
    if rec.index is None and any(m != "sparse_only" for m in modes):
        raise ConfigError(f"this run was trained without dense vectors: only modes=[sparse_only] apply (got {modes})")
    split_dir = Path(tcfg.data) / "splits" / (cfg.split or tcfg.split)
    for part in {"valid", cfg.split_name}:
        if not (split_dir / part).exists():
            raise DataError(f"{split_dir / part} not found (make the split with `cobra data split`)")
    max_hist = tcfg.model.max_items - 1
    valid_all = load_examples(split_dir / "valid", catalogue, max_hist)
    if cfg.valid_unseen:
        seen = checkpoint_users(valid_all, tcfg)
        if len(seen.targets) == len(valid_all.targets):
            raise ConfigError(f"valid_unseen: {cfg.run} was validated on every validation user (eval_users={tcfg.eval_users}), so none is unseen")
        valid_all = valid_all.without(seen.user_ids)
        log.info("valid_unseen: %d validation users left after the trainer's %d", len(valid_all.targets), len(seen.targets))
    valid = valid_all.sample(cfg.max_users if cfg.valid_users < 0 else cfg.valid_users, cfg.seed)
    target_all = valid_all if cfg.split_name == "valid" else load_examples(split_dir / cfg.split_name, catalogue, max_hist)
    target = target_all.sample(cfg.max_users, cfg.seed)

    def score(users, settings, label, keep_users=False):
        if cfg.workers > 0:
            res = evaluate_ray(cfg.run, cfg.index, users.history, users.targets, settings, ks, cfg.batch_users, cfg.workers,
                               cfg.worker_cpus, cfg.worker_gpus, cfg.device, cfg.ray_address, diversity_ids=cfg.diversity_ids,
                               keep_users=keep_users, index_device=cfg.index_device)
        else:
            res = evaluate_local(rec, users.history, users.targets, settings, ks, cfg.batch_users, device, keep_users=keep_users)
        if keep_users:
            per_user.update(res.per_user)
        passes.append({"pass": label, "users": res.users, "settings": len(settings), "seconds": round(res.seconds, 2),
                       "users_per_s": round(res.users / res.seconds, 1) if res.seconds else None,
                       "user_settings_per_s": round(res.users * len(settings) / res.seconds, 1) if res.seconds else None})
        log.info("%s: %d users x %d settings in %.1fs", label, res.users, len(settings), res.seconds)
        return res.table(cfg.confidence)

    passes: list[dict] = []
    per_user: dict = {}
    base = inference_params(tcfg.inference)
    taus = [float(t) for t in cfg.grid_tau] or [base.tau]
    psis = [float(p) for p in cfg.grid_psi] or [base.psi]
    beam_counts = [int(b) for b in cfg.grid_beams] or [base.beams]
    norms = [str(n) for n in cfg.grid_normalize] or [base.normalize]
    weights = [float(w) for w in cfg.grid_prior_weight] or [base.prior_weight]
    free_weights = [float(w) for w in cfg.grid_free_query_weight] or [base.free_query_weight]
    mix_weights = [float(w) for w in cfg.grid_free_mix_weight] or [base.free_mix_weight]
    if "cobra" in modes:
        check_free_query_head(tcfg.model, cfg.run, free_query_weight=max(free_weights), free_mix_weight=max(mix_weights))
    if "cobra" in modes and max(weights) > 0:
        from cobra_scale.retrieve.prior import load_or_build

        rec.prior = load_or_build(cfg.run, catalogue.item_ids)  # saved in <run>/prior: Ray actors load it from there
        log.info("transition prior: %d items, %d transitions", rec.prior.spec.items, rec.prior.matrix.nnz)
    values = {"tau": taus, "psi": psis, "beams": beam_counts, "normalize": norms, "prior_weight": weights, "free_query_weight": free_weights,
              "free_mix_weight": mix_weights}
    chosen: dict = {}
    selection: dict[str, list[dict]] = {}
    for m in modes:
        # the grid's parameters that change mode m's ranking; a single point is applied, several are chosen on valid
        dims = GRID_PARAMS.get(m, ())
        points = [dict(zip(dims, p)) for p in itertools.product(*(values[d] for d in dims))]
        # the cobra-only mixtures are off in the other modes, whatever the run's own inference config holds
        mode_base = base if m == "cobra" else replace(base, prior_weight=0.0, free_query_weight=0.0, free_mix_weight=0.0)
        if len(points) <= 1:
            chosen[m] = replace(mode_base, mode=m, **(points[0] if points else {}))
            continue
        settings = [Setting(f"grid|{m}|" + "|".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()),
                            replace(mode_base, mode=m, **p)) for p in points]
        table = score(valid, settings, f"valid grid ({m})")
        best = max(settings, key=lambda s: table[s.name]["metrics"][select_on])
        chosen[m] = best.params
        selection[m] = [{**p, **table[s.name]["metrics"]} for p, s in zip(points, settings)]
        log.info("%s chosen on valid (%s): %s", m, select_on, ", ".join(f"{d}={getattr(best.params, d)}" for d in dims))

    settings = []
    for m in modes:
        settings.append(Setting(m, chosen[m]))
        if cfg.exclude_history:
            settings.append(Setting(f"{m}|masked", replace(chosen[m], exclude_history=True)))
    sweep_taus = [float(t) for t in cfg.tau_sweep]
    cobra_p = chosen.get("cobra", replace(base, mode="cobra"))
    settings += [Setting(f"sweep|tau={t:g}", replace(cobra_p, tau=t)) for t in sweep_taus]
    table = score(target, settings, f"{cfg.split_name}", keep_users=cfg.per_user)

    results: dict = {
        "run": str(cfg.run),
        "split": str(split_dir),
        "split_name": cfg.split_name,
        "index": cfg.index,
        "diversity_ids": cfg.diversity_ids,
        "users": len(target.targets),
        "population": len(target_all.targets),
        "valid_grid_users": len(valid.targets),
        "valid_unseen": cfg.valid_unseen,
        "sampled": len(target.targets) < len(target_all.targets),
        "sample_seed": cfg.seed,
        "users_with_targets": table[settings[0].name]["users"],
        "confidence": cfg.confidence,
        "ci_method": "normal approximation over the sampled users: mean ± z·s/√n",
        "ks": list(ks),
        "select_on": select_on,
        "workers": cfg.workers,
        "modes": {},
    }
    for m in modes:
        entry = {"chosen_on_valid": {"tau": chosen[m].tau, "psi": chosen[m].psi, "beams": chosen[m].beams, "normalize": chosen[m].normalize,
                                     "prior_weight": chosen[m].prior_weight, "free_query_weight": chosen[m].free_query_weight,
                                     "free_mix_weight": chosen[m].free_mix_weight, "free_mix_candidates": chosen[m].free_mix_candidates}}
        if m in selection:
            entry["valid_grid"] = selection[m]
        entry["history_not_masked"] = table[m]["metrics"]
        entry["ci"] = table[m]["ci"]
        if cfg.exclude_history:
            entry["history_masked"] = table[f"{m}|masked"]["metrics"]
            entry["ci_masked"] = table[f"{m}|masked"]["ci"]
        results["modes"][m] = entry
    out = Path(cfg.out or cfg.run)
    out.mkdir(parents=True, exist_ok=True)
    if sweep_taus:
        from cobra_scale.eval.plots import plot_tau_sweep

        points = [{"tau": t, **table[f"sweep|tau={t:g}"]["metrics"]} for t in sweep_taus]
        results["tau_sweep"] = {"psi": cobra_p.psi, "beams": cobra_p.beams, "points": points,
                                "png": str(plot_tau_sweep(points, ks[0], out / f"tau_sweep_{cfg.split_name}.png"))}
    if cfg.plots:
        results["embeddings"] = embedding_plots(rec, out, cfg.plot_ids, cfg.plot_items, cfg.seed)
    if cfg.per_user:
        results["per_user"] = str(write_per_user(out / f"per_user_{cfg.split_name}.parquet", target.user_ids, per_user, [s.name for s in settings]))
    results["passes"] = passes
    results["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    (out / f"eval_{cfg.split_name}.json").write_text(json.dumps(results, indent=2))
    (out / f"eval_{cfg.split_name}.md").write_text(markdown_table(results))
    summary = {}
    for m, entry in results["modes"].items():
        for variant, key, ci in (("", "history_not_masked", "ci"), (" (history masked)", "history_masked", "ci_masked")):
            for name, v in entry.get(key, {}).items():
                if not name.startswith("diversity"):
                    summary[f"{m} {name}{variant}"] = f"{v:.4f} ± {entry[ci][name]:.4f}"
    summary["users"] = f"{results['users']} of {results['population']}"
    summary["out"] = str(out / f"eval_{cfg.split_name}.json")
    return summary


def write_per_user(path: Path, user_ids, columns: dict, settings: list[str]) -> Path:
    """The target pass's per-user values: ``user_id``, ``has_target`` and one float column per
    ``<setting>/<metric>`` (the τ-sweep points left out), one row per scored user in sample order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = [s for s in settings if not s.startswith("sweep|")]
    data = {"user_id": pa.array(np.asarray(user_ids)), "has_target": pa.array(np.asarray(columns["has_target"], dtype=bool))}
    for key in sorted(columns):
        if key.rsplit("/", 1)[0] in keep:
            data[key] = pa.array(np.asarray(columns[key], dtype=np.float64))
    pq.write_table(pa.table(data), path)
    return path


def embedding_plots(rec, out: Path, n_ids: int, n_items: int, seed: int) -> dict:
    """Fig. 4 (intra/inter-ID cosine heatmap) and Fig. 5 (2-D map by ID) of the item vectors."""
    from cobra_scale.eval.plots import id_cosine_matrix, plot_id_cosine, plot_item_map

    if rec.vectors is None:
        raise ConfigError("plots=true needs dense item vectors (this run has none)")
    sids = rec.sids.cpu().numpy()
    mat, ids = id_cosine_matrix(rec.vectors.cpu(), sids, n_ids, seed=seed)
    heat = plot_id_cosine(mat, ids, out / "embeddings_cosine.png")
    where = plot_item_map(rec.vectors.cpu(), sids, out / "embeddings_map.png", n_ids=min(n_ids, 10), max_items=n_items, seed=seed)
    return {"cosine": {**heat, "png": str(out / "embeddings_cosine.png")}, "map": {**where, "png": str(out / "embeddings_map.png")}}


def markdown_table(results: dict) -> str:
    """Recall/NDCG/diversity@K per mode (± confidence half-width) as a Markdown table."""
    ks = results["ks"]
    pct = int(round(results["confidence"] * 100))
    lines = [
        f"Run `{results['run']}`, split `{results['split']}` ({results['split_name']}), "
        f"{results['users']} users of {results['population']}"
        + (f" (uniform sample, seed {results['sample_seed']})" if results["sampled"] else "")
        + f", {results['users_with_targets']} with targets. ± = {pct}% confidence half-width ({results['ci_method']}).",
        "",
        "| mode | history | " + " | ".join(f"R@{k} | N@{k} | D@{k}" for k in ks) + " |",
        "|---|---|" + "---|" * (3 * len(ks)),
    ]
    for m, entry in results["modes"].items():
        for variant, key, ci in (("kept", "history_not_masked", "ci"), ("masked", "history_masked", "ci_masked")):
            if key not in entry:
                continue
            vals, half = entry[key], entry[ci]
            cells = []
            for k in ks:
                cells += [f"{vals[f'recall@{k}']:.4f} ± {half[f'recall@{k}']:.4f}", f"{vals[f'ndcg@{k}']:.4f} ± {half[f'ndcg@{k}']:.4f}", f"{vals[f'diversity@{k}']:.1f}"]
            lines.append(f"| {m} | {variant} | " + " | ".join(cells) + " |")
    chosen = [f"{m}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["chosen_on_valid"].items())
              for m, entry in results["modes"].items()]
    lines += ["", "Settings (chosen on validation where a grid was given): " + "; ".join(chosen) + "."]
    if "tau_sweep" in results:
        k = ks[0]
        lines += ["", f"τ sweep (cobra, psi={results['tau_sweep']['psi']:g}, beams={results['tau_sweep']['beams']}):", "",
                  f"| τ | R@{k} | D@{k} |", "|---|---|---|"]
        lines += [f"| {p['tau']:g} | {p[f'recall@{k}']:.4f} | {p[f'diversity@{k}']:.1f} |" for p in results["tau_sweep"]["points"]]
    passes = results.get("passes", [])
    if passes:
        lines += ["", "| pass | users | settings | seconds | users/s |", "|---|---|---|---|---|"]
        lines += [f"| {p['pass']} | {p['users']} | {p['settings']} | {p['seconds']} | {p['users_per_s']} |" for p in passes]
    return "\n".join(lines) + "\n"
