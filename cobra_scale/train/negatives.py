"""Catalogue-wide negatives for the dense loss: a bank of every item's latest vector.

The in-batch softmax of the paper scores a prediction against the batch's items only
(about 2,000 on Beauty at batch 256). :class:`VectorBank` keeps the most recent encoding
of every catalogue item (no gradient): rows of the batch's items are replaced after each
step with what the step encoded, and the whole bank is re-encoded once per epoch. Each
step the model adds a second dense term: the predictions against ``negatives`` bank
items (all of them with ``negatives = -1``) plus the batch's, with the target's *bank*
vector as the positive, so the prediction side learns a softmax over the catalogue, as
the SASRec-CE baseline's item softmax is, while only the batch's items go through the
text encoder (whose gradient comes from the in-batch term).

The positives come from the bank too: with the batch's fresh vectors among stale bank
negatives, the model learned to tell fresh from stale (the encoder drifts between steps)
instead of items, and the held-out dense loss stayed at chance (measured, docs/model.md).

Items held out of training (a cold-start split's cold items) are never drawn.
"""

from __future__ import annotations

import numpy as np
import torch


class VectorBank:
    """The latest dense vector of each of N catalogue items, and the sampling of negatives from it."""

    def __init__(self, vectors: torch.Tensor, negatives: int, held_out: np.ndarray | None = None):
        if vectors.ndim != 2:
            raise ValueError("vectors must be (N, d)")
        self.vectors = vectors.detach().float().clone()
        self.negatives = int(negatives)
        allowed = np.ones(len(vectors), dtype=bool) if held_out is None else ~held_out.astype(bool)
        self.pool = torch.from_numpy(np.flatnonzero(allowed)).to(self.vectors.device)

    def __len__(self) -> int:
        return len(self.vectors)

    def refresh(self, vectors: torch.Tensor) -> None:
        """Replace every row (a fresh encoding of the catalogue, e.g. each epoch)."""
        if vectors.shape != self.vectors.shape:
            raise ValueError(f"bank holds {tuple(self.vectors.shape)}, got {tuple(vectors.shape)}")
        self.vectors.copy_(vectors.detach().float())

    @torch.no_grad()
    def update(self, items: torch.Tensor, vectors: torch.Tensor) -> None:
        """Rows ``items`` (U,) catalogue indices get ``vectors`` (U, d) (what a step encoded)."""
        self.vectors[items.to(self.vectors.device)] = vectors.detach().float().to(self.vectors.device)

    def sample(self, batch_items: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys for one step: ``(vectors (E, d), item indices (E,), sorted)`` of the bank.

        ``negatives = -1`` (or more than the pool) takes every allowed item; otherwise a
        uniform sample of that many. The batch's own items are always included (the
        targets need their bank vector as the positive).
        """
        pool = self.pool
        if 0 <= self.negatives < len(pool):
            pick = torch.randperm(len(pool), generator=generator, device=pool.device)[: self.negatives]
            pool = torch.cat([pool[pick], batch_items.to(pool.device)]).unique()  # unique() sorts
        return self.vectors[pool], pool


def same_id_candidates(buckets: tuple[np.ndarray, np.ndarray, np.ndarray], items: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Keys of the ID-restricted dense term (``id_bank_negatives``) for catalogue ``items`` (U,).

    ``buckets`` is :meth:`~cobra_scale.train.data.Catalogue.id_buckets`. Returns (U, n + 2)
    catalogue indices: column 0 the item itself (the positive), then the other items of its
    full sparse ID -- every one when the ID holds at most ``n + 1`` items, else ``n + 1`` draws
    with repeats removed -- padded with -1.
    """
    order, start, size = buckets
    items = np.asarray(items, dtype=np.int64)
    width = n + 1
    if not len(order):
        return np.concatenate([items[:, None], np.full((len(items), width), -1, dtype=np.int64)], axis=1)
    sz = size[items][:, None]
    drawn = (rng.random((len(items), width)) * sz).astype(np.int64)
    offsets = np.where(sz <= width, np.arange(width)[None, :], drawn)
    cand = np.where(offsets < sz, order[np.minimum(start[items][:, None] + offsets, len(order) - 1)], -1)
    cand[cand == items[:, None]] = -1
    cand.sort(axis=1)
    cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # repeats of a draw
    return np.concatenate([items[:, None], cand], axis=1)
