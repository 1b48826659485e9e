"""In-memory exact item index whose buckets are the sparse IDs.

The interface (``search_in_ids`` for "ANN inside C(ID)", ``search`` over all items) is
the one the sharded faiss IVF index implements for large catalogues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ExactIdIndex:
    """Items grouped by sparse ID; cosine similarity by exact matrix products.

    Args:
        item_vectors: (N, d) dense vectors (normalised here).
        item_sids: (N,) packed sparse ID of each item.
    """

    def __init__(self, item_vectors: torch.Tensor, item_sids: torch.Tensor):
        self.vectors = F.normalize(item_vectors.float(), dim=-1)
        order = torch.argsort(item_sids, stable=True)
        self.order = order  # items sorted by ID
        sorted_sids = item_sids[order]
        self.unique_sids, counts = torch.unique_consecutive(sorted_sids, return_counts=True)
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts
        self.max_bucket = int(counts.max()) if len(counts) else 0

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def bucket_items(self, sids: torch.Tensor) -> torch.Tensor:
        """(Q,) IDs -> (Q, max_bucket) item indices, -1 padded (unknown IDs: all -1)."""
        pos = torch.searchsorted(self.unique_sids, sids).clamp(max=len(self.unique_sids) - 1)
        found = self.unique_sids[pos] == sids
        size = torch.where(found, self.counts[pos], torch.zeros_like(pos))
        ar = torch.arange(self.max_bucket, device=sids.device)
        slot = self.starts[pos][:, None] + ar[None]
        inside = ar[None] < size[:, None]
        return torch.where(inside, self.order[slot.clamp(max=len(self.order) - 1)], torch.full_like(slot, -1))

    def search_in_ids(self, queries: torch.Tensor, sids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item of ID ``sids[q]`` scored by cosine with ``queries[q]``.

        Returns ``(items (Q, max_bucket) -1 padded, cos (Q, max_bucket) -inf padded)``.
        """
        items = self.bucket_items(sids)
        vecs = self.vectors[items.clamp(min=0)]  # (Q, C, d)
        cos = torch.einsum("qd,qcd->qc", F.normalize(queries.float(), dim=-1), vecs)
        return items, cos.masked_fill(items < 0, float("-inf"))

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` items over the whole catalogue by cosine.

        ``exclude`` (Q, H) item indices (-1 padded) removed from each query's ranking.
        """
        cos = F.normalize(queries.float(), dim=-1) @ self.vectors.T  # (Q, N)
        if exclude is not None:
            cos = mask_items(cos, exclude, inplace=True)  # cos is a fresh (Q, N) product
        scores, items = cos.topk(min(k, cos.shape[1]), dim=-1)
        return items, scores


def mask_items(scores: torch.Tensor, exclude: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Set ``scores[q, exclude[q, j]]`` to -inf for every non-negative entry of ``exclude`` (Q, H)."""
    exclude = exclude.to(scores.device, torch.long)
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(exclude)
    keep = exclude >= 0
    out = scores if inplace else scores.clone()
    out[rows[keep], exclude[keep]] = float("-inf")
    return out
