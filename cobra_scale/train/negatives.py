"""Catalogue-wide negatives for the dense loss: a bank of every item's latest vector.

The in-batch softmax of the paper scores a prediction against the batch's items only
(about 2,000 on Beauty at batch 256). :class:`VectorBank` keeps the most recent encoding
of every catalogue item (no gradient): rows of the batch's items are replaced after each
step with what the step encoded, and the whole bank is re-encoded once per epoch. Each
step then adds up to ``negatives`` items of the bank that are not in the batch (all of
them with ``negatives = -1``) as extra keys, so the dense loss approaches a full softmax
over the catalogue, as the SASRec-CE baseline's item softmax is, while only the batch's
items go through the text encoder.

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
        """Negatives for one step: ``(vectors (E, d), item indices (E,))`` of bank items not in ``batch_items``.

        ``negatives = -1`` (or more than the pool) takes every allowed item; otherwise a
        uniform sample of that many (before the batch's items are dropped from it).
        """
        pool = self.pool
        if 0 <= self.negatives < len(pool):
            pick = torch.randperm(len(pool), generator=generator, device=pool.device)[: self.negatives]
            pool = pool[pick]
        in_batch = torch.zeros(len(self.vectors), dtype=torch.bool, device=pool.device)
        in_batch[batch_items.to(pool.device)] = True
        keep = pool[~in_batch[pool]]
        return self.vectors[keep], keep
