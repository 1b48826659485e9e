"""Figures of ``cobra eval``: the τ recall–diversity curve (paper Fig. 6) and the item
embedding plots — intra/inter-ID cosine heatmap (Fig. 4), 2-D map coloured by ID (Fig. 5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tau_sweep(points: list[dict], k: int, path: str | Path) -> Path:
    """``points``: ``[{"tau": t, "recall@k": r, "diversity@k": d}, ...]`` -> a 2-panel PNG.

    Left: recall@k against diversity@k, one point per τ (the trade-off curve); right: both
    against τ.
    """
    plt = _plt()
    pts = sorted(points, key=lambda p: p["tau"])
    taus = [p["tau"] for p in pts]
    rec = [p[f"recall@{k}"] for p in pts]
    div = [p[f"diversity@{k}"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110)
    a.plot(div, rec, marker="o")
    for t, x, y in zip(taus, div, rec):
        a.annotate(f"τ={t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xlabel(f"diversity@{k} (distinct IDs in top {k})")
    a.set_ylabel(f"recall@{k}")
    a.set_title("BeamFusion: recall vs diversity")
    b.plot(taus, rec, marker="o", color="C0", label=f"recall@{k}")
    if min(taus) > 0 and max(taus) / min(taus) >= 10:
        b.set_xscale("log")
    b.set_xlabel("τ (beam-score temperature)")
    b.set_ylabel(f"recall@{k}", color="C0")
    b2 = b.twinx()
    b2.plot(taus, div, marker="s", color="C1", label=f"diversity@{k}")
    b2.set_ylabel(f"diversity@{k}", color="C1")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def id_cosine_matrix(vectors: torch.Tensor, sids: np.ndarray, n_ids: int, max_per_id: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine between the items of the ``n_ids`` largest IDs: ``(matrix (n, n), ids (n,))``.

    Diagonal entries are intra-ID means over distinct item pairs; off-diagonal entries
    inter-ID means. Each ID contributes at most ``max_per_id`` sampled items.
    """
    rng = np.random.default_rng(seed)
    uniq, counts = np.unique(sids, return_counts=True)
    keep = uniq[np.argsort(-counts, kind="stable")[:n_ids]]
    groups = []
    for sid in keep:
        members = np.flatnonzero(sids == sid)
        if len(members) > max_per_id:
            members = rng.choice(members, max_per_id, replace=False)
        groups.append(members)
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1).cpu()
    n = len(keep)
    mat = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            c = (unit[groups[i]] @ unit[groups[j]].T).numpy()
            if i == j:
                m = len(groups[i])
                mat[i, i] = (c.sum() - np.trace(c)) / (m * (m - 1)) if m > 1 else np.nan
            else:
                mat[i, j] = mat[j, i] = c.mean()
    return mat, keep


def plot_id_cosine(mat: np.ndarray, ids: np.ndarray, path: str | Path) -> dict:
    """Heatmap of :func:`id_cosine_matrix`; returns the mean intra- and inter-ID cosine."""
    plt = _plt()
    n = len(ids)
    fig, ax = plt.subplots(figsize=(5.6, 4.8), dpi=110)
    im = ax.imshow(mat, cmap="viridis")
    ax.set_title(f"mean cosine of item vectors, {n} largest IDs")
    ax.set_xlabel("sparse ID (rank by size)")
    ax.set_ylabel("sparse ID (rank by size)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    off = ~np.eye(n, dtype=bool)
    return {"intra_id_cosine": float(np.nanmean(np.diag(mat))), "inter_id_cosine": float(mat[off].mean()) if n > 1 else float("nan"), "ids": n}


def plot_item_map(vectors: torch.Tensor, sids: np.ndarray, path: str | Path, n_ids: int = 10, max_items: int = 1500, seed: int = 0) -> dict:
    """2-D map of sampled item vectors of the ``n_ids`` largest IDs, coloured by ID.

    t-SNE (scikit-learn, when installed) on the unit vectors, else the first two principal
    components. Returns which method drew it and how many items.
    """
    plt = _plt()
    rng = np.random.default_rng(seed)
    uniq, counts = np.unique(sids, return_counts=True)
    keep = uniq[np.argsort(-counts, kind="stable")[:n_ids]]
    members = np.flatnonzero(np.isin(sids, keep))
    if len(members) > max_items:
        members = np.sort(rng.choice(members, max_items, replace=False))
    x = torch.nn.functional.normalize(vectors[members].float(), dim=-1).cpu().numpy()
    method = "pca"
    try:
        from sklearn.manifold import TSNE

        if len(x) > 5:
            xy = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
            method = "t-SNE"
    except ImportError:
        pass
    if method == "pca":
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    label = np.searchsorted(np.sort(keep), sids[members])
    fig, ax = plt.subplots(figsize=(5.6, 4.8), dpi=110)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=label, cmap="tab10" if len(keep) <= 10 else "tab20", s=6)
    ax.set_title(f"item vectors ({method}), {len(members)} items of the {len(keep)} largest IDs")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(sc, ax=ax, label="sparse ID")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"method": method, "items": int(len(members)), "ids": int(len(keep))}
