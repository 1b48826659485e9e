"""Top-K ranking metrics (Recall@K, NDCG@K) over full-catalogue rankings.

Definitions (per user, then averaged over the users that have at least one target):

* one target (leave-one-out, the public benchmarks): ``recall@k`` = 1 if the target is in
  the top ``k`` else 0; ``ndcg@k`` = ``1 / log2(rank + 2)`` with ``rank`` the 0-based
  position of the target in the ranking (0 if absent from the top ``k``). This is the
  papers' ``1/log2(rank+1)`` with 1-based ranks.
* several targets (time split): ``recall@k = |top-k ∩ targets| / |targets|`` (the
  standard definition; it cannot reach 1 when ``|targets| > k``), and
  ``ndcg@k = DCG@k / IDCG@k`` with binary gains, ``DCG@k = Σ_{hit at rank r < k} 1/log2(r+2)``
  and the ideal DCG over ``min(|targets|, k)`` hits at ranks ``0, 1, ...``.
  With one target both reduce to the single-target formulas.

Targets of a user must be distinct, and so must the items of one ranked row (a top-K
list). Users with no target are skipped (not counted in the average).

:func:`topk_with_exclusion` computes the ranked lists, optionally with items removed
from a user's ranking (the "history masked" evaluation: items the user already
interacted with are not recommended).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["MetricAccumulator", "UserMeans", "diversity", "rank_metrics", "topk_with_exclusion", "metric_names", "user_metrics"]


def metric_names(ks: Iterable[int]) -> list[str]:
    """``["recall@5", "ndcg@5", "recall@10", "ndcg@10"]`` for ``ks=(5, 10)``."""
    return [f"{name}@{k}" for k in ks for name in ("recall", "ndcg")]


def _padded_targets(targets: Sequence[np.ndarray] | np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values (U, T), valid (U, T) bool)`` from a (U,) / (U, T) array or a list of arrays."""
    if isinstance(targets, np.ndarray) and targets.dtype != object:
        values = targets.reshape(n_rows, -1) if targets.ndim == 1 else targets
        if values.shape[0] != n_rows:
            raise ValueError(f"targets has {values.shape[0]} rows, the ranking {n_rows}")
        return values.astype(np.int64, copy=False), np.ones(values.shape, dtype=bool)
    rows = [np.asarray(t, dtype=np.int64).reshape(-1) for t in targets]
    if len(rows) != n_rows:
        raise ValueError(f"targets has {len(rows)} rows, the ranking {n_rows}")
    width = max((len(r) for r in rows), default=0)
    values = np.zeros((n_rows, max(width, 1)), dtype=np.int64)
    valid = np.zeros((n_rows, max(width, 1)), dtype=bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
        valid[i, : len(r)] = True
    return values, valid


def _per_user(ranked_items: np.ndarray, targets: Sequence[np.ndarray] | np.ndarray, ks: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-user metric values ``{name: (U,)}`` and the mask of users that have targets."""
    ranked = np.asarray(ranked_items)
    if ranked.ndim != 2:
        raise ValueError(f"ranked_items must be (U, K), got shape {ranked.shape}")
    n_users, kmax = ranked.shape
    if any(k <= 0 or k > kmax for k in ks):
        raise ValueError(f"every k must be in [1, {kmax}] (the ranked list length), got {list(ks)}")
    values, valid = _padded_targets(targets, n_users)
    n_targets = valid.sum(axis=1)  # (U,)
    # hit[u, j]: the item at rank j of user u is one of u's targets.  (U, K, T) -> (U, K)
    hit = ((ranked[:, :, None] == values[:, None, :]) & valid[:, None, :]).any(axis=2)
    discounts = 1.0 / np.log2(np.arange(kmax, dtype=np.float64) + 2.0)  # (K,)
    cum_hits = np.cumsum(hit, axis=1)  # (U, K)
    cum_dcg = np.cumsum(hit * discounts, axis=1)  # (U, K)
    ideal_cum = np.cumsum(discounts)  # (K,) ideal DCG@k when min(|T|, k) = k
    has = n_targets > 0
    denom = np.maximum(n_targets, 1).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = np.where(has, cum_hits[:, k - 1] / denom, 0.0)
        idcg = ideal_cum[np.clip(np.minimum(n_targets, k) - 1, 0, None)]
        out[f"ndcg@{k}"] = np.where(has, cum_dcg[:, k - 1] / idcg, 0.0)
    return out, has


class MetricAccumulator:
    """Streams batches of rankings and averages the metrics over all users seen.

    Example::

        acc = MetricAccumulator(ks=(5, 10))
        for ranked, targets in batches:      # ranked: (B, 10) item ids
            acc.update(ranked, targets)
        acc.result()  # {"recall@5": ..., "ndcg@5": ..., "recall@10": ..., "ndcg@10": ...}
    """

    def __init__(self, ks: Sequence[int] = (5, 10)):
        self.ks = tuple(int(k) for k in ks)
        self.sums = {name: 0.0 for name in metric_names(self.ks)}
        self.count = 0  # users with at least one target

    def update(self, ranked_items: np.ndarray | torch.Tensor, targets: Sequence[np.ndarray] | np.ndarray) -> None:
        """Add a batch: ``ranked_items`` (B, Kmax) item ids, best first; ``targets`` per user."""
        if isinstance(ranked_items, torch.Tensor):
            ranked_items = ranked_items.detach().cpu().numpy()
        per_user, has = _per_user(ranked_items, targets, self.ks)
        for name, vals in per_user.items():
            self.sums[name] += float(vals.sum())
        self.count += int(has.sum())

    def result(self) -> dict[str, float]:
        """The averages so far (0.0 for every metric when no user was seen)."""
        return {name: (s / self.count if self.count else 0.0) for name, s in self.sums.items()}


def diversity(ranked_items: np.ndarray, item_sids: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per user, the number of distinct sparse IDs among the top ``k`` items (padding -1 ignored).

    Args:
        ranked_items: (U, Kmax) item indices, best first, -1 padded.
        item_sids: (N,) packed sparse ID of every item.

    Returns:
        ``{"diversity@k": (U,) float}`` for every ``k``.
    """
    ranked = np.asarray(ranked_items)
    sids = np.where(ranked >= 0, np.asarray(item_sids)[ranked.clip(min=0)], -1)  # (U, K)
    out = {}
    for k in ks:
        top = np.sort(sids[:, :k], axis=1)
        first = top[:, :1] >= 0
        changes = (top[:, 1:] != top[:, :-1]) & (top[:, 1:] >= 0)
        out[f"diversity@{k}"] = (first.sum(1) + changes.sum(1)).astype(np.float64)
    return out


def user_metrics(
    ranked_items: np.ndarray | torch.Tensor,
    targets: Sequence[np.ndarray] | np.ndarray,
    ks: Sequence[int],
    item_sids: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-user ``recall@k``, ``ndcg@k`` (and ``diversity@k`` when ``item_sids`` is given).

    Returns ``({name: (U,) values}, has (U,) bool)``; users without a target have 0
    recall/ndcg and ``has`` False (leave them out of averages).
    """
    if isinstance(ranked_items, torch.Tensor):
        ranked_items = ranked_items.detach().cpu().numpy()
    values, has = _per_user(ranked_items, targets, ks)
    if item_sids is not None:
        values.update(diversity(ranked_items, item_sids, ks))
    return values, has


class UserMeans:
    """Streaming means of per-user values with a normal-approximation confidence interval.

    The half-width is ``z * s / sqrt(n)`` with ``s`` the sample standard deviation of the
    per-user values and ``z`` the normal quantile of the confidence level: the interval
    of the mean over a uniform sample of users (the sampling error, not model variance).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.squares: dict[str, float] = {}
        self.count = 0

    def update(self, values: dict[str, np.ndarray], keep: np.ndarray) -> None:
        """Add users: ``values`` {name: (B,)}, only rows where ``keep`` (B,) is True count."""
        keep = np.asarray(keep, dtype=bool)
        for name, v in values.items():
            v = np.asarray(v, dtype=np.float64)[keep]
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
            self.squares[name] = self.squares.get(name, 0.0) + float((v * v).sum())
        self.count += int(keep.sum())

    def merge(self, other: "UserMeans") -> "UserMeans":
        for name in other.sums:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.squares[name] = self.squares.get(name, 0.0) + other.squares[name]
        self.count += other.count
        return self

    def mean(self) -> dict[str, float]:
        return {name: (s / self.count if self.count else 0.0) for name, s in self.sums.items()}

    def half_width(self, confidence: float = 0.95) -> dict[str, float]:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        n = self.count
        out = {}
        for name, s in self.sums.items():
            if n < 2:
                out[name] = float("nan")
                continue
            var = max(self.squares[name] - s * s / n, 0.0) / (n - 1)
            out[name] = z * (var / n) ** 0.5
        return out


def rank_metrics(ranked_items: np.ndarray, targets: Sequence[np.ndarray] | np.ndarray, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall@k and NDCG@k of ranked lists, averaged over users (see the module docstring).

    Args:
        ranked_items: (U, Kmax) int64 item ids, best first; ``Kmax >= max(ks)``.
        targets: (U,) one target per user, (U, T) a fixed number each, or a list of U
            arrays (any number each, distinct items).
        ks: cut-offs.

    Returns:
        ``{"recall@5": float, "ndcg@5": float, "recall@10": ..., ...}``.
    """
    acc = MetricAccumulator(ks)
    acc.update(ranked_items, targets)
    return acc.result()


def topk_with_exclusion(
    scores: torch.Tensor,
    k: int,
    exclude: torch.Tensor | Sequence[np.ndarray | Sequence[int] | torch.Tensor] | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, with some columns excluded per row.

    Args:
        scores: (U, N) float scores over N candidates (column = candidate index).
        k: how many to return (``k <= N``).
        exclude: candidates to drop from each row's ranking (set to ``-inf``): a (U, H)
            integer tensor padded with -1, or a list of U index arrays (possibly empty).
            ``None`` excludes nothing. Indices are column indices of ``scores``.
        inplace: write the ``-inf`` into ``scores`` instead of a copy (saves a (U, N) copy).

    Returns:
        (U, k) int64 column indices, best first. Rows with fewer than ``k`` candidates
        left end with excluded columns (score ``-inf``).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (U, N), got shape {tuple(scores.shape)}")
    if exclude is not None:
        n_rows = scores.shape[0]
        if isinstance(exclude, torch.Tensor):
            if exclude.ndim != 2 or exclude.shape[0] != n_rows:
                raise ValueError(f"exclude must be (U, H) with U={n_rows}, got shape {tuple(exclude.shape)}")
            from cobra_scale.retrieve.exact import mask_items

            scores = mask_items(scores, exclude, inplace=inplace)
        else:
            if not inplace:
                scores = scores.clone()
            if len(exclude) != n_rows:
                raise ValueError(f"exclude has {len(exclude)} rows, scores {n_rows}")
            cols = [torch.as_tensor(np.asarray(e, dtype=np.int64) if not isinstance(e, torch.Tensor) else e, dtype=torch.long).reshape(-1) for e in exclude]
            lengths = torch.tensor([len(c) for c in cols], dtype=torch.long)
            if int(lengths.sum()):
                rows = torch.repeat_interleave(torch.arange(n_rows), lengths).to(scores.device)
                scores[rows, torch.cat(cols).to(scores.device)] = float("-inf")
    return torch.topk(scores, k, dim=1).indices


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0, chunk: int = 250) -> dict:
    """The mean of ``b - a`` over the same users, with two intervals for it.

    ``a`` and ``b`` (U,) hold one per-user value of two models (or configs) scored on the same
    users in the same order. ``normal``: mean ± z·s_d/√U over the per-user differences d (the
    paired interval: the users' shared difficulty cancels). ``bootstrap``: the percentile interval
    of the mean difference over ``resamples`` resamples of the users with replacement (seeded),
    which makes no normality assumption. Both measure the sampling error of the *users and targets*,
    not a model's seed-to-seed variance.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two (U,) arrays of one length, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 2:
        raise ValueError(f"a paired difference needs at least 2 users, got {n}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError("confidence must be in (0, 1) and resamples >= 1")
    d = b - a
    mean = float(d.mean())
    acc = UserMeans()  # the same normal interval as every reported mean, here of the per-user differences
    acc.update({"d": d}, np.ones(n, dtype=bool))
    half = acc.half_width(confidence)["d"]
    rng = np.random.default_rng(seed)
    boots = np.empty(resamples)
    for lo in range(0, resamples, chunk):
        m = min(chunk, resamples - lo)
        boots[lo : lo + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo_q, hi_q = np.quantile(boots, [alpha, 1 - alpha])
    return {
        "users": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": mean,
        "normal": [mean - half, mean + half],
        "bootstrap": [float(lo_q), float(hi_q)],
        "bootstrap_p_le_0": float((boots <= 0).mean()),
        "users_b_better": int((d > 0).sum()),
        "users_a_better": int((d < 0).sum()),
    }
