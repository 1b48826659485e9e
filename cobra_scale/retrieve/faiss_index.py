"""Sharded faiss IVF index whose inverted lists are the sparse semantic IDs.

COBRA's coarse-to-fine step scores the items *of one sparse ID* against the dense vector
the decoder predicted for that ID ("ANN inside C(ID)"). An IVF index does exactly this
when its inverted lists are the IDs: items are added with their list assigned by hand
(``faiss.contrib.ivf_tools.add_preassigned``) and a beam's ID is searched by naming its
list (``search_preassigned``, ``nprobe = 1``). The coarse quantiser is never used, so it
stays empty.

* **Lists.** One list per full ID that exists; ``list_sids[l]`` is the packed ID of list
  ``l``. Lists are allocated with spare capacity and grown (doubling) when new IDs come.
* **Codes.** ``flat`` (default) stores the L2-normalised float32 vectors: the inner
  product is the exact cosine, so the result inside an ID equals
  :class:`~cobra_scale.retrieve.exact.ExactIdIndex`. ``pq`` stores product-quantised
  codes (``pq_m`` bytes per item at 8 bits), a memory option with approximate scores.
* **Shards.** Items are split by catalogue index range into N shards, one faiss index
  each (same lists, same PQ codebook); a query searches every shard and the per-shard
  top-k are merged. Faiss ids are global catalogue indices, so merging is a top-k.
* **GPU.** With ``device="auto"`` and a faiss GPU build (``faiss.get_num_gpus() > 0``)
  shards are copied to the GPU for search; the CPU copy stays the master for ``add``
  and ``save``.

The interface is :class:`~cobra_scale.retrieve.exact.ExactIdIndex`'s (``search_in_ids``,
``search``, ``bucket_items``), so ``Recommender(model, codes, vectors, index=...)``
takes either.

Example::

    index = IdIvfIndex.build(item_vectors, item_sids, shards=4)
    items, cos = index.search_in_ids(beam_vectors, beam_sids)   # (Q, C), -1 / -inf padded
    index.add(new_vectors, new_sids)                             # no rebuild
    index.save("runs/x/index");  index = IdIvfIndex.load("runs/x/index")
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cobra_scale.errors import CobraError, DataError

log = logging.getLogger(__name__)

FORMAT = "cobra_scale.id_ivf.v1"
KINDS = ("flat", "pq")
# rows x lists of one preassigned call of `search` (bounds the (Q, nlist) list_nos array)
_SEARCH_CELLS = 1 << 22


def _faiss():
    import faiss

    return faiss


def _as_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, d) float32 C-contiguous, L2-normalised rows (zero rows stay zero)."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise DataError(f"vectors must be (N, d), got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_i64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


@dataclass
class Shard:
    """One faiss IVF index holding the items with catalogue index in ``[start, end)``."""

    index: object  # faiss.IndexIVF, the CPU master copy
    start: int
    end: int  # exclusive; the last shard's end grows when items are added
    info: dict = field(default_factory=dict)  # how it was built (written as JSON)
    search_index: object = None  # GPU copy used for search, or None (search the master)
    scan: tuple | None = None  # flat kind on the CPU: (the shard's vectors (n, d) tensor, their item numbers), built on first use

    def searcher(self):
        return self.search_index if self.search_index is not None else self.index

    def full_scan(self, xq: np.ndarray, k: int, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k), items (Q, k))`` of every item of the shard, faiss' padding (-FLT_MAX / -1).

        A flat shard searched on the CPU scores its items by matrix products (torch's BLAS, blocks of items) over a
        copy of its vectors gathered from the inverted lists once: the same inner products as scanning every list,
        2.4-3.9x faster for a batch of 64 queries at 1M items on one core, at the cost of a second copy of the vectors
        (N x d float32). PQ shards and GPU copies scan their lists (:meth:`scan_lists`).
        """
        if len(xq) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        faiss = _faiss()
        if self.search_index is None and isinstance(self.index, faiss.IndexIVFFlat):
            if self.scan is None:
                self.scan = _flat_copy(faiss, self.index)
            return _scan_topk(*self.scan, xq, k)
        return self.scan_lists(xq, k, n_lists)

    def scan_lists(self, xq: np.ndarray, k: int, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`full_scan` by ``search_preassigned`` over all ``n_lists`` lists (a dot product per item, no BLAS)."""
        index = self.searcher()
        index.nprobe = n_lists
        lists = np.broadcast_to(np.arange(n_lists, dtype=np.int64), (len(xq), n_lists))
        return _search_preassigned(index, xq, min(k, max(self.index.ntotal, 1)), lists)


class IdIvfIndex:
    """Items bucketed by sparse ID in sharded faiss IVF indexes (cosine = inner product).

    Build with :meth:`build`, reopen with :meth:`load`. Item numbers are catalogue
    indices (0..N-1) unless given.

    Attributes:
        max_per_id: candidates returned per ID by :meth:`search_in_ids`; 0 = all the
            items of the ID (exact BeamFusion, as :class:`ExactIdIndex`).
    """

    def __init__(
        self,
        dim: int,
        kind: str,
        list_sids: np.ndarray,
        nlist: int,
        shards: list[Shard],
        meta: dict | None = None,
        device: str = "cpu",
        list_sizes: np.ndarray | None = None,
    ):
        self.dim, self.kind = int(dim), kind
        self.nlist = int(nlist)
        self.list_sids = np.asarray(list_sids, dtype=np.int64)  # (lists in use,)
        self.shards = shards
        self.meta = dict(meta or {})
        self.max_per_id = 0
        self.device = "cpu"
        self._refresh_lookup()
        self._list_sizes = self._count_lists() if list_sizes is None else np.asarray(list_sizes, dtype=np.int64)
        if device != "cpu":
            self.to_device(device)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        item_vectors: torch.Tensor | np.ndarray,
        item_sids: torch.Tensor | np.ndarray,
        shards: int = 1,
        kind: str = "flat",
        pq_m: int = 16,
        pq_bits: int = 8,
        train_size: int = 100_000,
        items: np.ndarray | None = None,
        device: str = "cpu",
        seed: int = 0,
        progress: bool = False,
    ) -> "IdIvfIndex":
        """An index over ``item_vectors`` (N, d) bucketed by ``item_sids`` (N,) packed IDs.

        Args:
            shards: number of shards; item ranges of (nearly) equal size.
            kind: ``flat`` (exact inside an ID) or ``pq`` (``pq_m`` sub-quantisers of
                ``pq_bits`` bits, trained on ``train_size`` sampled vectors).
            items: (N,) item numbers stored in the index (default ``0..N-1``); must be
                increasing so that shards are item ranges.
            device: ``cpu``, ``cuda`` or ``auto`` (GPU faiss when available).
        """
        faiss = _faiss()
        if kind not in KINDS:
            raise DataError(f"index kind must be one of {KINDS}, got {kind!r}")
        x = _as_f32(item_vectors)
        sids = _as_i64(item_sids)
        n, d = x.shape
        if len(sids) != n:
            raise DataError(f"{n} vectors but {len(sids)} sparse IDs")
        if n == 0:
            raise DataError("no items to index")
        ids = np.arange(n, dtype=np.int64) if items is None else _as_i64(items)
        if len(ids) != n or (n > 1 and np.any(np.diff(ids) <= 0)):
            raise DataError("item numbers must be one per vector, strictly increasing")
        if shards < 1 or shards > n:
            raise DataError(f"shards must be in [1, {n}] (the item count), got {shards}")
        if kind == "pq" and d % pq_m:
            raise DataError(f"pq_m={pq_m} must divide the vector dimension {d}")
        started = time.perf_counter()
        list_sids = np.unique(sids)
        nlist = _capacity(len(list_sids))
        template = _empty_ivf(d, nlist, kind, pq_m, pq_bits)
        if kind == "pq":
            rng = np.random.default_rng(seed)
            sample = x if n <= train_size else x[np.sort(rng.choice(n, train_size, replace=False))]
            if len(sample) < (1 << pq_bits):
                raise DataError(f"pq needs at least {1 << pq_bits} vectors to train {pq_bits}-bit codebooks, got {len(sample)}")
            template.pq.train(sample)
        assign = np.searchsorted(list_sids, sids)  # list number of each item
        bounds = np.linspace(0, n, shards + 1).round().astype(np.int64)
        out: list[Shard] = []
        for s in range(shards):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            index = faiss.clone_index(template) if shards > 1 else template
            _add_chunked(index, x[lo:hi], assign[lo:hi], ids[lo:hi], progress and s == 0)
            start = int(ids[lo])
            end = int(ids[hi]) if hi < n else int(ids[-1]) + 1
            out.append(Shard(index, start, end))
        meta = {
            "built_seconds": round(time.perf_counter() - started, 3),
            "pq_m": pq_m if kind == "pq" else None,
            "pq_bits": pq_bits if kind == "pq" else None,
            "train_vectors": int(min(n, train_size)) if kind == "pq" else 0,
        }
        index = cls(d, kind, list_sids, nlist, out, meta, device=device, list_sizes=np.bincount(assign, minlength=len(list_sids)))
        log.info("indexed %d items in %d IDs, %d shard(s), kind %s, %.1fs", n, len(list_sids), shards, kind, meta["built_seconds"])
        return index

    def add(self, vectors: torch.Tensor | np.ndarray, sids: torch.Tensor | np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """Add items without a rebuild; returns their item numbers.

        New IDs get new lists. Items go to the shard whose range holds their number;
        numbers past the last shard's range extend it (default: ``len(self)``, ...).
        """
        x = _as_f32(vectors)
        if x.shape[1] != self.dim:
            raise DataError(f"vectors have dimension {x.shape[1]}, the index {self.dim}")
        s = _as_i64(sids)
        if len(s) != len(x):
            raise DataError(f"{len(x)} vectors but {len(s)} sparse IDs")
        ids = np.arange(self.next_item, self.next_item + len(x), dtype=np.int64) if items is None else _as_i64(items)
        if len(ids) != len(x):
            raise DataError(f"{len(x)} vectors but {len(ids)} item numbers")
        if (ids < 0).any():
            raise DataError("item numbers must be >= 0")
        new = np.setdiff1d(np.unique(s), self.list_sids)
        if len(new):
            needed = len(self.list_sids) + len(new)
            if needed > self.nlist:
                self._grow_lists(_capacity(needed))
            self.list_sids = np.concatenate([self.list_sids, new])
            self._refresh_lookup()
            self._list_sizes = np.concatenate([self._list_sizes, np.zeros(len(new), np.int64)])
        lists = self.lists_of(s)
        starts = np.array([sh.start for sh in self.shards])
        which = np.clip(np.searchsorted(starts, ids, side="right") - 1, 0, len(self.shards) - 1)
        for k, shard in enumerate(self.shards):
            pick = which == k
            if not pick.any():
                continue
            _add_chunked(shard.index, x[pick], lists[pick], ids[pick])
            if k == len(self.shards) - 1:
                shard.end = max(shard.end, int(ids[pick].max()) + 1)
            shard.search_index = None
            shard.scan = None
        np.add.at(self._list_sizes, lists, 1)
        if self.device != "cpu":
            self.to_device(self.device)
        return ids

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return int(sum(sh.index.ntotal for sh in self.shards))

    @property
    def next_item(self) -> int:
        """The first item number past every shard's range (where :meth:`add` appends)."""
        return max(sh.end for sh in self.shards)

    @property
    def max_bucket(self) -> int:
        """Items of the largest ID, over all shards."""
        return int(self._list_sizes.max()) if len(self._list_sizes) else 0

    def lists_of(self, sids: torch.Tensor | np.ndarray) -> np.ndarray:
        """(Q,) packed IDs -> (Q,) list numbers, -1 for IDs without items."""
        s = _as_i64(sids)
        if not len(self._sorted_sids):
            return np.full(len(s), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_sids, s).clip(max=len(self._sorted_sids) - 1)
        return np.where(self._sorted_sids[pos] == s, self._sorted_lists[pos], -1)

    def bucket_items(self, sids: torch.Tensor) -> torch.Tensor:
        """(Q,) IDs -> (Q, max_bucket) item numbers of each ID, -1 padded (as ExactIdIndex)."""
        faiss = _faiss()
        lists = self.lists_of(sids)
        out = np.full((len(lists), max(self.max_bucket, 1)), -1, dtype=np.int64)
        for row, l in enumerate(lists):
            if l < 0:
                continue
            got = []
            for shard in self.shards:
                inv = shard.index.invlists
                size = inv.list_size(int(l))
                if size:
                    got.append(faiss.rev_swig_ptr(inv.get_ids(int(l)), size).copy())
            if got:
                members = np.sort(np.concatenate(got))
                out[row, : len(members)] = members
        return torch.from_numpy(out).to(sids.device if isinstance(sids, torch.Tensor) else "cpu")

    # ------------------------------------------------------------------ search

    def search_in_ids(self, queries: torch.Tensor, sids: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The items of ID ``sids[q]`` ranked by cosine with ``queries[q]``.

        Args:
            queries: (Q, d) vectors (normalised here); sids: (Q,) packed IDs.
            k: candidates per query (default ``max_per_id`` or, if 0, all of the ID's items).

        Returns:
            ``(items (Q, k) -1 padded, cos (Q, k) -inf padded)``, best first, on the
            queries' device.
        """
        k = int(k or self.max_per_id or self.max_bucket or 1)
        xq = _as_f32(queries)
        lists = self.lists_of(sids)[:, None]  # (Q, 1); -1 lists are skipped by faiss
        parts = []
        for shard in self.shards:
            index = shard.searcher()
            index.nprobe = 1
            kk = min(k, max(shard.index.ntotal, 1))
            parts.append(_search_preassigned(index, xq, kk, lists))
        items, scores = _merge(parts, k)
        dev = queries.device if isinstance(queries, torch.Tensor) else "cpu"
        return torch.from_numpy(items).to(dev), torch.from_numpy(scores).to(dev)

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` items over every ID by cosine (every list of every shard is scanned).

        ``exclude`` (Q, H) item numbers (-1 padded) removed from each query's ranking:
        each shard returns ``k + H`` so that the top ``k`` survive the removal.
        """
        xq = _as_f32(queries)
        n_lists = len(self.list_sids)
        extra = int((exclude >= 0).sum(1).max()) if exclude is not None and exclude.numel() else 0
        kk = k + extra
        rows = max(1, _SEARCH_CELLS // max(n_lists, 1))
        out_items, out_scores = [], []
        for lo in range(0, len(xq), rows):
            chunk = xq[lo : lo + rows]
            items, scores = _merge([shard.full_scan(chunk, kk, n_lists) for shard in self.shards], kk)
            if extra:
                ex = exclude[lo : lo + rows].detach().cpu().numpy()
                hit = ((items[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0)).any(-1)
                scores = np.where(hit, -np.inf, scores).astype(np.float32)
                order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
                items, scores = np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)
                items = np.where(np.isfinite(scores), items, -1)
            out_items.append(items[:, :k])
            out_scores.append(scores[:, :k])
        dev = queries.device if isinstance(queries, torch.Tensor) else "cpu"
        items = np.concatenate(out_items) if out_items else np.zeros((0, k), np.int64)
        scores = np.concatenate(out_scores) if out_scores else np.zeros((0, k), np.float32)
        return torch.from_numpy(items).to(dev), torch.from_numpy(scores).to(dev)

    # ------------------------------------------------------------------ devices

    def to_device(self, device: str) -> "IdIvfIndex":
        """Copy shards to the GPU for search (``cuda``/``auto``); ``cpu`` drops the copies.

        ``auto`` falls back to CPU (with a log line) when faiss has no GPU or a shard
        cannot be searched there; ``cuda`` raises instead.
        """
        faiss = _faiss()
        if device == "cpu":
            for shard in self.shards:
                shard.search_index = None
            self.device = "cpu"
            return self
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if gpus == 0:
            if device == "cuda":
                raise CobraError("device=cuda but this faiss build sees no GPU (install faiss-gpu, see pyproject's `gpu` extra)")
            return self
        try:
            if not hasattr(self, "_gpu_res"):
                self._gpu_res = faiss.StandardGpuResources()
            for k, shard in enumerate(self.shards):
                if shard.search_index is None:
                    shard.search_index = _to_gpu(faiss, self._gpu_res, shard.index, k % gpus, self.dim)
            probe = np.zeros((1, self.dim), np.float32)
            for shard in self.shards:
                shard.search_index.nprobe = 1
                _search_preassigned(shard.search_index, probe, 1, np.zeros((1, 1), np.int64))
            self.device = "cuda"
        except Exception as exc:  # faiss GPU builds differ in what they support
            for shard in self.shards:
                shard.search_index = None
            if device == "cuda":
                raise CobraError(f"faiss GPU search failed: {exc}") from exc
            log.warning("faiss GPU search unavailable (%s); searching on CPU", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.device = "cpu"
        return self

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``index.json``, ``lists.safetensors`` and ``shard-SSSSS.{faiss,json}``."""
        from safetensors.numpy import save_file

        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shard_meta = []
        for k, shard in enumerate(self.shards):
            name = f"shard-{k:05d}"
            faiss.write_index(shard.index, str(folder / f"{name}.faiss"))
            info = {
                **shard.info,
                "shard": k,
                "items_start": shard.start,
                "items_end": shard.end,
                "items": int(shard.index.ntotal),
                "kind": self.kind,
                "faiss_class": type(shard.index).__name__,
                "nlist": self.nlist,
                "code_size": int(shard.index.code_size),
                "bytes": (folder / f"{name}.faiss").stat().st_size,
            }
            (folder / f"{name}.json").write_text(json.dumps(info, indent=2))
            shard_meta.append({"file": f"{name}.faiss", "json": f"{name}.json", "items_start": shard.start, "items_end": shard.end, "items": info["items"]})
        save_file({"list_sids": np.ascontiguousarray(self.list_sids)}, str(folder / "lists.safetensors"))
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "kind": self.kind,
            "metric": "inner_product on L2-normalised vectors (cosine)",
            "lists": "one inverted list per sparse ID (lists.safetensors: list_sids[l] = packed ID of list l)",
            "nlist": self.nlist,
            "ids": int(len(self.list_sids)),
            "items": len(self),
            "max_bucket": self.max_bucket,
            "max_per_id": self.max_per_id,
            "faiss_version": faiss.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.meta,
            **(extra or {}),
            "shards": shard_meta,
        }
        (folder / "index.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "IdIvfIndex":
        """Open an index written by :meth:`save` (``device`` as in :meth:`to_device`)."""
        from safetensors.numpy import load_file

        faiss = _faiss()
        folder = Path(folder)
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise DataError(f"{folder} has no index.json (build it with `cobra index`)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path} is not valid JSON: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        list_sids = load_file(str(folder / "lists.safetensors"))["list_sids"]
        shards = []
        for entry in meta["shards"]:
            path = folder / entry["file"]
            if not path.is_file():
                raise DataError(f"index shard {path} is missing")
            index = faiss.read_index(str(path))
            if not isinstance(index, faiss.IndexIVF) or index.d != meta["dim"] or index.nlist != meta["nlist"]:
                raise DataError(f"{path} is not an IVF index of dimension {meta['dim']} with {meta['nlist']} lists")
            if index.ntotal != entry["items"]:
                raise DataError(f"{path} holds {index.ntotal} items, index.json says {entry['items']}")
            info = json.loads((folder / entry["json"]).read_text()) if (folder / entry["json"]).is_file() else {}
            shards.append(Shard(index, int(entry["items_start"]), int(entry["items_end"]), info))
        keep = {k: meta[k] for k in ("built_seconds", "pq_m", "pq_bits", "train_vectors") if k in meta}
        index = cls(meta["dim"], meta["kind"], list_sids, meta["nlist"], shards, keep, device=device)
        index.max_per_id = int(meta.get("max_per_id") or 0)
        return index

    # ------------------------------------------------------------------ internals

    def _refresh_lookup(self) -> None:
        order = np.argsort(self.list_sids, kind="stable")
        self._sorted_sids = self.list_sids[order]
        self._sorted_lists = order.astype(np.int64)

    def _count_lists(self) -> np.ndarray:
        sizes = np.zeros(len(self.list_sids), dtype=np.int64)
        for shard in self.shards:
            inv = shard.index.invlists
            sizes += np.array([inv.list_size(l) for l in range(len(self.list_sids))], dtype=np.int64)
        return sizes

    def _grow_lists(self, nlist: int) -> None:
        """Give every shard ``nlist`` inverted lists, keeping their contents."""
        faiss = _faiss()
        for shard in self.shards:
            index = shard.index
            old = index.invlists
            new = faiss.ArrayInvertedLists(nlist, index.code_size)
            for l in range(index.nlist):
                size = old.list_size(l)
                if size:
                    new.add_entries(l, size, old.get_ids(l), old.get_codes(l))
            index.nlist = nlist  # replace_invlists checks the new lists' count against it
            index.replace_invlists(new, True)
            new.this.disown()  # owned by the index now
            shard.search_index = None
        log.info("grew the index to %d lists", nlist)
        self.nlist = nlist


def _capacity(n_ids: int) -> int:
    """Lists to allocate for ``n_ids`` IDs: room to add new IDs without regrowing often."""
    return max(16, int(n_ids * 1.25) + 1)


def _empty_ivf(d: int, nlist: int, kind: str, pq_m: int, pq_bits: int):
    """An IVF index whose lists are assigned by hand: empty coarse quantiser, no residuals."""
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(d)
    if kind == "flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # codes of the vectors themselves (no centroid to subtract)
    index.own_fields = True
    quantizer.this.disown()
    index.is_trained = True  # the quantiser is never used; PQ is trained by the caller
    return index


def _add_chunked(index, x: np.ndarray, lists: np.ndarray, ids: np.ndarray, progress: bool = False, chunk: int = 262_144) -> None:
    from faiss.contrib.ivf_tools import add_preassigned
    from tqdm import tqdm

    starts = range(0, len(x), chunk)
    for lo in tqdm(starts, desc="index add", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        add_preassigned(index, np.ascontiguousarray(x[lo : lo + chunk]), np.ascontiguousarray(lists[lo : lo + chunk]), np.ascontiguousarray(ids[lo : lo + chunk]))


def _flat_copy(faiss, index) -> tuple[torch.Tensor, np.ndarray]:
    """``(vectors (n, d) float32, item numbers (n,))``: every vector of a flat IVF index, list by list."""
    inv, d = index.invlists, index.d
    vectors, ids = [], []
    for l in range(index.nlist):
        size = inv.list_size(l)
        if size:
            vectors.append(faiss.rev_swig_ptr(inv.get_codes(l), size * index.code_size).view(np.float32).reshape(size, d).copy())
            ids.append(faiss.rev_swig_ptr(inv.get_ids(l), size).copy())
    if not vectors:
        return torch.zeros(0, d), np.zeros(0, np.int64)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(vectors))), np.concatenate(ids).astype(np.int64)


def _scan_topk(vectors: torch.Tensor, ids: np.ndarray, xq: np.ndarray, k: int, block: int = 1 << 17) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (Q, k'), items (Q, k'))`` best first, k' = min(k, n): the top ``k`` inner products of ``xq`` with
    ``vectors``, a block of items at a time (each block's top k, then the top k of those), so the score matrix held at
    once is Q x ``block``."""
    n = vectors.shape[0]
    k = min(int(k), n)
    if k == 0:
        return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
    q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))
    top_scores, top_rows = [], []
    for lo in range(0, n, block):
        scores = q @ vectors[lo : lo + block].T
        s, r = scores.topk(min(k, scores.shape[1]), dim=1)
        top_scores.append(s)
        top_rows.append(r + lo)
    scores, rows = torch.cat(top_scores, 1), torch.cat(top_rows, 1)
    if scores.shape[1] > k:
        scores, pos = scores.topk(k, dim=1)
        rows = rows.gather(1, pos)
    return scores.numpy(), ids[rows.numpy()]


def _search_preassigned(index, xq: np.ndarray, k: int, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (Q, k), items (Q, k))`` with faiss' padding (-FLT_MAX / -1)."""
    from faiss.contrib.ivf_tools import search_preassigned

    if len(xq) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return search_preassigned(index, xq, k, np.ascontiguousarray(lists, dtype=np.int64))


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard ``(scores, items)`` -> ``(items (Q, k) -1 padded, scores (Q, k) -inf padded)``."""
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    items = np.concatenate([p[1] for p in parts], axis=1)
    scores[items < 0] = -np.inf
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
    if len(parts) > 1 or scores.shape[1] > k:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, items = np.take_along_axis(scores, order, 1), np.take_along_axis(items, order, 1)
    items = np.where(np.isfinite(scores), items, -1)
    return items.astype(np.int64), scores


def _to_gpu(faiss, res, index, gpu: int, dim: int):
    """A GPU copy of a CPU IVF shard (its quantiser gets ``nlist`` zero centroids, unused)."""
    cpu = faiss.clone_index(index)
    if cpu.quantizer.ntotal != cpu.nlist:
        cpu.quantizer.reset()
        cpu.quantizer.add(np.zeros((cpu.nlist, dim), np.float32))
    return faiss.index_cpu_to_gpu(res, gpu, cpu)


def pack_sids(codes: torch.Tensor | np.ndarray, codes_per_level: int) -> np.ndarray:
    """(N, L) codes -> (N,) packed IDs (``Σ code_l * K^(L-1-l)``, as the Recommender packs)."""
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    packed = np.zeros(len(c), dtype=np.int64)
    for level in range(c.shape[1]):
        packed = packed * codes_per_level + c[:, level].astype(np.int64)
    return packed


__all__ = ["IdIvfIndex", "KINDS", "pack_sids"]
