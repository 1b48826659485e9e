"""Offline evaluation of a Recommender on history -> targets examples (full ranking)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from cobra_scale.eval.metrics import MetricAccumulator
from cobra_scale.retrieve.recommender import InferenceParams, Recommender


def evaluate(
    recommender: Recommender,
    history: torch.Tensor,
    targets: list[np.ndarray],
    params: InferenceParams,
    ks: tuple[int, ...] = (5, 10),
    batch_users: int = 256,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Recall@k / NDCG@k of ``recommender`` over users with ``history`` (U, S) and ``targets``."""
    acc = MetricAccumulator(ks)
    kmax = max(ks)
    starts = range(0, len(targets), batch_users)
    for start in tqdm(starts, desc=f"eval {params.mode}", unit="batch", disable=not progress, leave=False):
        h = history[start : start + batch_users].to(device)
        items, _ = recommender.recommend(h, kmax, params)
        acc.update(items.cpu().numpy(), targets[start : start + batch_users])
    return acc.result()
