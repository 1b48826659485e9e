"""Item-range index shards and the fan-out/merge that makes them look like one index.

A catalogue of N items is cut into ``num_shards`` contiguous ranges of catalogue
indices. Each :class:`IndexShard` holds an index over its range (exact by default; any
object with ``search_in_ids``/``search`` like :class:`~cobra_scale.retrieve.exact.ExactIdIndex`
fits) and answers in *global* indices. :class:`ShardedIndex` sends a query batch to every
shard at once, then merges: "inside these IDs" results are concatenated (the union of
each ID's items across shards), top-k results are re-ranked. It implements the same
interface, so the :class:`~cobra_scale.retrieve.recommender.Recommender` does not know
whether its index is local or spread over Serve deployments.

Pure torch: the Serve layer passes shard *clients* (Ray deployment handles), the tests
pass local shards.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from cobra_scale.retrieve.exact import ExactIdIndex


def shard_ranges(n_items: int, num_shards: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` contiguous item ranges of near-equal size covering ``0..n_items``."""
    if not 1 <= num_shards <= max(1, n_items):
        raise ValueError(f"num_shards must be in 1..{n_items}, got {num_shards}")
    bounds = np.linspace(0, n_items, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def packed_sids(codes: torch.Tensor, codes_per_level: int) -> torch.Tensor:
    """(N, L) codes -> (N,) packed sparse IDs (the Recommender's packing)."""
    sids = torch.zeros(len(codes), dtype=torch.long)
    for level in range(codes.shape[1]):
        sids = sids * codes_per_level + codes[:, level].long()
    return sids


def exact_index(vectors: torch.Tensor, sids: torch.Tensor) -> ExactIdIndex:
    return ExactIdIndex(vectors, sids)


def faiss_flat_index(vectors: torch.Tensor, sids: torch.Tensor):
    """The faiss IVF index whose inverted lists are the sparse IDs (flat lists: exact inside an ID)."""
    from cobra_scale.retrieve.faiss_index import IdIvfIndex

    return IdIvfIndex.build(vectors, sids, shards=1, kind="flat")


# name -> builder(vectors (n, d), sids (n,)) of a shard's local index (local item numbers 0..n-1)
INDEX_KINDS: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"exact": exact_index, "faiss": faiss_flat_index}


class IndexShard:
    """An index over catalogue items ``lo..hi-1``, answering in global item indices."""

    def __init__(self, index, lo: int, hi: int):
        self.index, self.lo, self.hi = index, lo, hi

    @classmethod
    def build(cls, vectors: torch.Tensor, sids: torch.Tensor, lo: int, hi: int, kind: str = "exact") -> "IndexShard":
        """``vectors``/``sids`` are this shard's rows only (``hi - lo`` of them)."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r} (known: {sorted(INDEX_KINDS)})")
        return cls(INDEX_KINDS[kind](vectors, sids), lo, hi)

    def _to_global(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items >= 0, items + self.lo, items)

    def search_in_ids(self, queries: torch.Tensor, sids: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, d), (Q,) -> items (Q, C) global, -1 padded; cos (Q, C), -inf padded (``k``: at most the best k per query)."""
        items, cos = self.index.search_in_ids(queries, sids, k) if k else self.index.search_in_ids(queries, sids)
        return self._to_global(items), cos

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` of this shard's items; ``exclude`` (Q, H) global indices, -1 padded."""
        if exclude is not None:
            inside = (exclude >= self.lo) & (exclude < self.hi)
            exclude = torch.where(inside, exclude - self.lo, torch.full_like(exclude, -1))
        items, scores = self.index.search(queries, k, exclude)
        return self._to_global(items), scores


def load_shard(folder: str | Path, shard: int, num_shards: int, kind: str = "exact") -> tuple[IndexShard, str]:
    """Shard ``shard`` of ``num_shards`` of a serving bundle, read from disk: ``(shard, bundle key)``."""
    from cobra_scale.serve.bundle import META_FILE, load_bundle

    n = int(json.loads((Path(folder) / META_FILE).read_text())["items"])
    lo, hi = shard_ranges(n, num_shards)[shard]
    bundle = load_bundle(folder, rows=(lo, hi))
    if bundle.vectors is None:
        raise ValueError(f"{folder} holds no item vectors (a sparse-only model needs no index shards)")
    return IndexShard.build(bundle.vectors, packed_sids(bundle.codes, bundle.codes_per_level), lo, hi, kind), bundle.key


class ShardClient(Protocol):
    """Something that starts a shard call and returns an object with ``.result()``."""

    def submit(self, method: str, *args) -> Future: ...


class LocalShard:
    """A :class:`ShardClient` over an in-process :class:`IndexShard` (tests, single process)."""

    def __init__(self, shard: IndexShard):
        self.shard = shard

    def submit(self, method: str, *args) -> Future:
        future: Future = Future()
        future.set_result(getattr(self.shard, method)(*args))
        return future


class ShardedIndex:
    """Fan a query batch out to every shard, merge into one answer (ExactIdIndex's interface).

    ``max_per_id`` (0 = all) caps the candidates of each beam's ID as ``ExactIdIndex`` does: each shard returns its
    best ``max_per_id`` of the ID, and the merge keeps the best ``max_per_id`` of their union (the same set as one index).
    """

    def __init__(self, shards: list[ShardClient], max_per_id: int = 0):
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        if max_per_id < 0:
            raise ValueError(f"max_per_id must be >= 0, got {max_per_id}")
        self.shards = shards
        self.max_per_id = int(max_per_id)

    def _gather(self, method: str, *args) -> list[tuple[torch.Tensor, torch.Tensor]]:
        futures = [s.submit(method, *args) for s in self.shards]  # all in flight before waiting on any
        return [f.result() for f in futures]

    def search_in_ids(self, queries: torch.Tensor, sids: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = queries.device
        cap = int(k or self.max_per_id)
        args = (queries.detach().cpu(), sids.cpu()) + ((cap,) if cap else ())
        parts = self._gather("search_in_ids", *args)
        items = torch.cat([p[0] for p in parts], dim=1)
        cos = torch.cat([p[1] for p in parts], dim=1)
        if cap and cos.shape[1] > cap:
            cos, pos = cos.topk(cap, dim=1)
            items = items.gather(1, pos)
        return items.to(device), cos.to(device)

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = queries.device
        parts = self._gather("search", queries.detach().cpu(), k, None if exclude is None else exclude.cpu())
        items = torch.cat([p[0] for p in parts], dim=1)
        scores = torch.cat([p[1] for p in parts], dim=1)
        top, pos = scores.topk(min(k, scores.shape[1]), dim=-1)
        return items.gather(1, pos).to(device), top.to(device)


__all__ = ["INDEX_KINDS", "IndexShard", "LocalShard", "load_shard", "ShardClient", "ShardedIndex", "packed_sids", "shard_ranges"]
