"""Residual k-means: L levels of faiss k-means on successive residuals (no training loop).

Fast and robust: level l clusters the residuals left by levels < l. With ``balance`` the
centroids are fitted under a size-capped assignment (each code takes at most
``ceil(n / K * slack)`` items while fitting, the rest go to their next-nearest code), which
spreads the centroids over dense regions and keeps buckets from becoming giant. Items are
then always encoded greedily (nearest centroid per level), so a new item whose embedding
equals a training item's gets exactly that item's ID: fitting and cold start agree.
"""

from __future__ import annotations

import numpy as np


def _faiss_kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False, spherical=False, max_points_per_centroid=100_000)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()  # (k, d)


def _nearest(x: np.ndarray, centroids: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), top)
    return dist, idx


def capped_assign(x: np.ndarray, centroids: np.ndarray, slack: float = 1.5) -> np.ndarray:
    """Assign each row of ``x`` to a centroid, at most ``ceil(n/k * slack)`` rows per centroid.

    Rows are served in order of how much they lose by not getting their nearest centroid
    (most-confident first), each to its nearest centroid that still has room.
    """
    n, k = len(x), len(centroids)
    cap = int(np.ceil(n / k * slack))
    top = min(k, 8)
    dist, idx = _nearest(x, centroids, top)
    order = np.argsort(dist[:, 0] - (dist[:, 1] if top > 1 else 0.0))  # big margin first
    counts = np.zeros(k, dtype=np.int64)
    assign = np.full(n, -1, dtype=np.int64)
    leftovers = []
    for i in order:
        for c in idx[i]:
            if counts[c] < cap:
                assign[i] = c
                counts[c] += 1
                break
        else:
            leftovers.append(i)
    if leftovers:  # rare: all 8 nearest are full; take the nearest with room by exact search
        rest = np.asarray(leftovers)
        _, full = _nearest(x[rest], centroids, k)
        for i, row in zip(rest, full):
            c = next(c for c in row if counts[c] < cap)
            assign[i] = c
            counts[c] += 1
    return assign


class ResidualKMeans:
    """``fit(vectors)`` then ``encode(vectors) -> codes (N, L)``; ``decode(codes) -> (N, D)``."""

    def __init__(self, levels: int, codes: int, iters: int = 25, seed: int = 0, balance: bool = True):
        self.levels, self.codes, self.iters, self.seed, self.balance = levels, codes, iters, seed, balance
        self.centroids: np.ndarray | None = None  # (L, K, D)

    def fit(self, vectors: np.ndarray) -> "ResidualKMeans":
        residual = np.ascontiguousarray(vectors, dtype=np.float32)
        books = []
        for level in range(self.levels):
            c = _faiss_kmeans(residual, self.codes, self.iters, self.seed + level)
            assign = capped_assign(residual, c) if self.balance else _nearest(residual, c)[1][:, 0]
            if self.balance:  # centroids follow the capped assignment
                for k in range(self.codes):
                    members = assign == k
                    if members.any():
                        c[k] = residual[members].mean(0)
            books.append(c)
            residual = residual - c[assign]
        self.centroids = np.stack(books)
        return self

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Codes (N, L) int64 by greedy nearest centroid per level (training and new items alike)."""
        assert self.centroids is not None, "fit first"
        residual = np.ascontiguousarray(vectors, dtype=np.float32)
        codes = np.zeros((len(residual), self.levels), dtype=np.int64)
        for level in range(self.levels):
            codes[:, level] = _nearest(residual, self.centroids[level])[1][:, 0]
            residual = residual - self.centroids[level][codes[:, level]]
        return codes

    def fit_encode(self, vectors: np.ndarray) -> np.ndarray:
        """Fit, then the (greedy) codes of the training items."""
        return self.fit(vectors).encode(vectors)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        assert self.centroids is not None
        return sum(self.centroids[level][codes[:, level]] for level in range(self.levels)).astype(np.float32)
