"""Diagnostics of a semantic-ID assignment: are the codes used, and are the buckets sane?

In COBRA an ID is a bucket on purpose (the dense vector separates items inside it), so
sharing an ID is fine; collapsed levels (few codes used) or a few giant buckets are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pack_codes(codes: np.ndarray, codes_per_level: int) -> np.ndarray:
    """Codes (N, L) -> one int64 per item, ``sum_l code_l * K^(L-1-l)`` (lexicographic)."""
    packed = np.zeros(len(codes), dtype=np.int64)
    for level in range(codes.shape[1]):
        packed = packed * codes_per_level + codes[:, level]
    return packed


def diagnose(codes: np.ndarray, codes_per_level: int, vectors: np.ndarray | None = None, recon: np.ndarray | None = None) -> dict:
    """Usage, perplexity and bucket statistics of ``codes`` (N, L).

    Args:
        codes: (N, L) int codes.
        codes_per_level: K.
        vectors, recon: (N, D) embeddings and their reconstructions from the codes, for
            the reconstruction error (mean squared error and relative error).
    """
    n, levels = codes.shape
    per_level = []
    for level in range(levels):
        counts = np.bincount(codes[:, level], minlength=codes_per_level)
        p = counts[counts > 0] / n
        per_level.append(
            {
                "level": level,
                "codes_used": int((counts > 0).sum()),
                "usage": round(float((counts > 0).mean()), 4),
                "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
                "max_share": round(float(counts.max() / n), 4),
            }
        )
    _, bucket_sizes = np.unique(pack_codes(codes, codes_per_level), return_counts=True)
    out = {
        "items": int(n),
        "levels": int(levels),
        "codes_per_level": int(codes_per_level),
        "per_level": per_level,
        "distinct_ids": int(len(bucket_sizes)),
        "items_per_id": {
            "mean": round(float(bucket_sizes.mean()), 3),
            "median": float(np.median(bucket_sizes)),
            "p99": round(float(np.percentile(bucket_sizes, 99)), 1),
            "max": int(bucket_sizes.max()),
            "max_share_of_items": round(float(bucket_sizes.max() / n), 5),
        },
        "items_sharing_an_id": int(bucket_sizes[bucket_sizes > 1].sum()),
        "singleton_ids": int((bucket_sizes == 1).sum()),
    }
    if vectors is not None and recon is not None:
        err = ((vectors - recon) ** 2).sum(1)
        out["reconstruction"] = {
            "mse": round(float(err.mean() / vectors.shape[1]), 6),
            "relative_error": round(float(err.sum() / max((vectors**2).sum(), 1e-12)), 4),
        }
    return out


def bucket_histogram(codes: np.ndarray, codes_per_level: int, path: Path, title: str) -> Path:
    """PNG histogram of items per full ID (log-scaled counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, sizes = np.unique(pack_codes(codes, codes_per_level), return_counts=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    bins = np.unique(np.geomspace(1, sizes.max() + 1, 40).astype(int))
    ax.hist(sizes, bins=bins, color="#3b6ea8", edgecolor="white")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items per semantic ID")
    ax.set_ylabel("number of IDs")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(diag: dict) -> str:
    """A few human-readable lines of a :func:`diagnose` result."""
    lines = [f"{diag['items']} items, {diag['levels']} x {diag['codes_per_level']} codes, {diag['distinct_ids']} distinct IDs"]
    for lv in diag["per_level"]:
        lines.append(f"  level {lv['level']}: {lv['codes_used']}/{diag['codes_per_level']} codes used, perplexity {lv['perplexity']}, largest code {lv['max_share']:.1%}")
    ipi = diag["items_per_id"]
    lines.append(f"  items per ID: mean {ipi['mean']}, median {ipi['median']}, p99 {ipi['p99']}, max {ipi['max']} ({ipi['max_share_of_items']:.2%} of items)")
    lines.append(f"  items sharing an ID: {diag['items_sharing_an_id']}, singleton IDs: {diag['singleton_ids']}")
    if "reconstruction" in diag:
        r = diag["reconstruction"]
        lines.append(f"  reconstruction: mse {r['mse']}, relative error {r['relative_error']}")
    return "\n".join(lines)
