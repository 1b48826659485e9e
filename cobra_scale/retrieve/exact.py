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
        max_per_id: candidates per ID returned by :meth:`search_in_ids`, the best by cosine
            (0 = all the ID's items, exact BeamFusion over whole IDs; cap it when IDs hold thousands).

    :meth:`search_in_ids` works in bounded memory whatever the ID sizes: IDs of up to
    ``GATHER_MAX`` items are scored by gathering their vectors per query (in chunks of at most
    ``CELLS`` query-item pairs), larger IDs by one matrix product per ID over the queries
    that ask for it. Only its output, (Q, width), grows with the largest ID; past
    ``OUTPUT_CELLS`` it refuses with a message instead of exhausting memory.
    """

    GATHER_MAX = 512  # IDs up to this size: per-query gather; above: one product per ID
    CELLS = 1 << 22  # query-item pairs scored at once (x d floats gathered: 2 GB at d = 128)
    OUTPUT_CELLS = 1 << 26  # largest (Q, width) answer: 0.8 GB of items and cosines

    def __init__(self, item_vectors: torch.Tensor, item_sids: torch.Tensor, max_per_id: int = 0):
        if max_per_id < 0:
            raise ValueError(f"max_per_id must be >= 0, got {max_per_id}")
        self.max_per_id = int(max_per_id)  # candidates per ID that search_in_ids returns (0 = all), as IdIvfIndex
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

    def _lookup(self, sids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q,) IDs -> (position of each ID among ``unique_sids``, its item count; 0 for unknown IDs)."""
        pos = torch.searchsorted(self.unique_sids, sids).clamp(max=len(self.unique_sids) - 1)
        found = self.unique_sids[pos] == sids
        return pos, torch.where(found, self.counts[pos], torch.zeros_like(pos))

    def _members(self, pos: torch.Tensor, size: torch.Tensor, width: int) -> torch.Tensor:
        """The items of the IDs at ``pos`` (with ``size`` items each), (Q, width), -1 padded."""
        ar = torch.arange(width, device=pos.device)
        slot = (self.starts[pos][:, None] + ar[None]).clamp(max=len(self.order) - 1)
        return torch.where(ar[None] < size[:, None], self.order[slot], torch.full_like(slot, -1))

    def bucket_items(self, sids: torch.Tensor) -> torch.Tensor:
        """(Q,) IDs -> (Q, max_bucket) item indices, -1 padded (unknown IDs: all -1)."""
        return self._members(*self._lookup(sids), self.max_bucket)

    def search_in_ids(self, queries: torch.Tensor, sids: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The items of ID ``sids[q]`` ranked by cosine with ``queries[q]``.

        Args:
            queries: (Q, d) vectors (normalised here); sids: (Q,) packed IDs.
            k: candidates per query (default ``max_per_id`` or, if 0, all of the ID's items).

        Returns:
            ``(items (Q, w) -1 padded, cos (Q, w) -inf padded)``, best first, where
            ``w = min(k, largest ID)``.
        """
        from cobra_scale.errors import CobraError

        width = max(1, min(int(k or self.max_per_id or self.max_bucket or 1), self.max_bucket or 1))
        n_q = len(sids)
        if n_q * width > self.OUTPUT_CELLS:
            raise CobraError(
                f"scoring every item of the beams' IDs needs {n_q} x {width} candidates (the largest ID holds "
                f"{self.max_bucket} items): cap the candidates per ID with max_per_id (e.g. inference.max_per_id=1000, "
                "or `cobra index ... max_per_id=1000`), or search fewer users or beams at once"
            )
        q = F.normalize(queries.float(), dim=-1)
        items_out = torch.full((n_q, width), -1, dtype=torch.long, device=q.device)
        cos_out = torch.full((n_q, width), float("-inf"), dtype=q.dtype, device=q.device)
        if n_q == 0 or not len(self.unique_sids):
            return items_out, cos_out
        pos, size = self._lookup(sids)
        small = ((size > 0) & (size <= self.GATHER_MAX)).nonzero().view(-1)
        if len(small):  # per-query gather, rows sorted by ID size so that each chunk pads little
            small = small[torch.argsort(size[small], stable=True)]
            sorted_size = size[small]
            start = 0
            while start < len(small):
                # the most rows from ``start`` whose count x their longest ID (the last, sizes ascend) fits CELLS
                cells = torch.arange(1, len(small) - start + 1, device=q.device) * sorted_size[start:].clamp(min=1)
                rows = small[start : start + max(1, int(torch.searchsorted(cells, self.CELLS, right=True)))]
                cand = self._members(pos[rows], size[rows], int(size[rows[-1]]))
                cos = torch.einsum("qd,qcd->qc", q[rows], self.vectors[cand.clamp(min=0)]).masked_fill(cand < 0, float("-inf"))
                self._put(items_out, cos_out, rows, cand, cos)
                start += len(rows)
        large = (size > self.GATHER_MAX).nonzero().view(-1)
        for p in torch.unique(pos[large]).tolist():  # one product per large ID over its queries
            rows_all = large[pos[large] == p]
            members = self.order[int(self.starts[p]) : int(self.starts[p]) + int(self.counts[p])]
            vecs = self.vectors[members]
            step = max(1, self.CELLS // len(members))
            for lo in range(0, len(rows_all), step):
                rows = rows_all[lo : lo + step]
                cos = q[rows] @ vecs.T
                self._put(items_out, cos_out, rows, members[None].expand(len(rows), -1), cos)
        return items_out, cos_out

    @staticmethod
    def _put(items_out: torch.Tensor, cos_out: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, cos: torch.Tensor) -> None:
        """Write the best ``width`` of each row's candidates, best first."""
        width = items_out.shape[1]
        top, idx = cos.topk(min(width, cos.shape[1]), dim=1)
        items_out[rows, : top.shape[1]] = torch.gather(cand, 1, idx).masked_fill(torch.isinf(top), -1)
        cos_out[rows, : top.shape[1]] = top

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
