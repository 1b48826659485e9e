"""``cobra recommend``: print the top-K items of a trained run for a history, with titles."""

from __future__ import annotations

import numpy as np
import torch

from cobra_scale.errors import CobraError
from cobra_scale.train.configs import RecommendConfig, check_free_query_head


def run(cfg: RecommendConfig) -> dict:
    from pathlib import Path

    from cobra_scale.data.io import read_table
    from cobra_scale.train.data import load_examples
    from cobra_scale.train.trainer import inference_params, load_run, make_recommender

    model, catalogue, tcfg, device = load_run(cfg.run)
    max_hist = tcfg.model.max_items - 1
    titles = dict(zip(*[read_table(tcfg.items_path, columns=["item_id", "title"]).column(c).to_pylist() for c in ("item_id", "title")]))
    if cfg.history:
        ids = np.asarray([int(x) for x in cfg.history], dtype=np.int64)
        idx = catalogue.index_of(ids)
        if (idx < 0).any():
            raise CobraError(f"unknown item id(s) in history: {ids[idx < 0].tolist()}")
        idx = idx[-max_hist:]
        history = torch.full((1, max_hist), -1, dtype=torch.long)
        history[0, max_hist - len(idx) :] = torch.from_numpy(idx)
        labels = ["history"]
    else:
        test = load_examples(Path(tcfg.data) / "splits" / tcfg.split / "test", catalogue, max_hist)
        history = test.history[: cfg.users]
        labels = [f"user {u}" for u in test.user_ids[: cfg.users]]
    rec = make_recommender(model, catalogue, device)
    params = inference_params(cfg.inference, cfg.exclude_history)
    if params.prior_weight > 0:
        from cobra_scale.retrieve.prior import load_or_build

        rec.prior = load_or_build(cfg.run, catalogue.item_ids, build=False)
        if rec.prior is None:
            raise CobraError(f"inference.prior_weight > 0 needs {cfg.run}/prior: build it with `cobra prior --run {cfg.run}`")
    check_free_query_head(model.cfg, cfg.run, free_query_weight=params.free_query_weight, free_mix_weight=params.free_mix_weight)
    top, scores = rec.recommend(history.to(device), cfg.k, params)
    sids = rec.sids
    for row, label in enumerate(labels):
        hist_ids = [int(catalogue.item_ids[i]) for i in history[row].tolist() if i >= 0]
        print(f"\n{label}: last items " + " | ".join(titles.get(i, str(i))[:40] for i in hist_ids[-3:]))
        for rank, (i, s) in enumerate(zip(top[row].tolist(), scores[row].tolist()), 1):
            if i < 0:
                continue
            item = int(catalogue.item_ids[i])
            print(f"  {rank:2d}. item {item:>7}  score {s:.4f}  sid {int(sids[i]):>6}  {titles.get(item, '')[:70]}")
    return {"mode": params.mode, "k": cfg.k}
