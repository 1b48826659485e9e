"""Ray Serve deployments: HTTP ingress -> recommender (batched beam search) -> index shards.

::

    Ingress (FastAPI)                      validation, user-history lookup, named model slots
      └─ handle "default" ─> Recommender   @serve.batch: one beam search for many requests (GPU when present)
                               └─ handles ─> IndexShard 0..N-1   items of one catalogue range each (fan out, merge)

The ingress holds handles to *named* recommender deployments, so a second model version
(or an A/B router, issue #8) is one more handle, not a new ingress. The recommender's
``user_config`` (:class:`~cobra_scale.serve.engine.Settings`) changes inference defaults,
batching or the served run without a redeploy. Shards load the bundle the recommender
names in each call (two kept in memory), so a model swap needs no shard config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from cobra_scale.serve.api import ApiError, build_api
from cobra_scale.serve.coalesce import Coalescer
from cobra_scale.serve.engine import ModelEngine, Refusal, Settings
from cobra_scale.serve.schemas import Limits
from cobra_scale.serve.service import HistoryTable, ServiceBackend

log = logging.getLogger(__name__)

LOOPBACK_IPS = ("127.0.0.1", "::1", "localhost")


def loopback_replica_grpc() -> None:
    """Keep this replica's inter-deployment gRPC server on loopback when the node is loopback-only.

    Ray Serve 2.60 binds that server to ``[::]:0`` (every interface) whatever the node
    address. Called from a deployment's constructor, which runs before the server starts;
    on a node whose address is 127.0.0.1 the port is opened on 127.0.0.1 instead (peers
    reach it through the node address, so nothing else changes). Multi-node clusters with
    routable node addresses are left as Ray configures them.
    """
    import ray
    from ray.serve._private import replica as replica_module

    if ray.util.get_node_ip_address() not in LOOPBACK_IPS:
        return
    original = replica_module.add_port_to_grpc_server
    if getattr(original, "_cobra_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._cobra_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = add_port


def replica_device(device: str) -> str:
    """The device a replica runs on: ``auto`` is CUDA only when Ray gave this replica a GPU (Ray does not hide the
    node's GPUs from an actor that reserved none, and replicas sharing one unreserved would contend for it)."""
    if device != "auto":
        return device
    import ray

    if not ray.is_initialized():
        return device
    return "cuda" if ray.get_gpu_ids() else "cpu"


# ----------------------------------------------------------------------------- shards


@serve.deployment(name="IndexShard", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class IndexShardDeployment:
    """Catalogue items of range ``shard`` of ``num_shards``, searched for the recommender."""

    def __init__(self, shard: int, num_shards: int, kind: str = "exact", preload: str | None = None):
        loopback_replica_grpc()
        self.shard, self.num_shards, self.kind = shard, num_shards, kind
        self._indexes: OrderedDict[str, object] = OrderedDict()  # bundle key -> IndexShard (old + new during a swap)
        self._lock = threading.Lock()
        if preload:
            self.load(preload)

    def load(self, folder: str, key: str | None = None) -> dict:
        """Load (or find) this shard of the bundle in ``folder``; its key must be ``key`` when given."""
        from cobra_scale.serve.shards import load_shard

        with self._lock:
            if key is not None and key in self._indexes:
                self._indexes.move_to_end(key)
                return {"key": key, "cached": True}
            index, found = load_shard(folder, self.shard, self.num_shards, self.kind)
            if key is not None and found != key:
                raise Refusal(503, f"index shard {self.shard}: bundle {folder} holds other weights than the recommender's; retry after its rebuild")
            self._indexes[found] = index
            while len(self._indexes) > 2:
                self._indexes.popitem(last=False)
            log.info("index shard %d/%d: items %d..%d of %s", self.shard, self.num_shards, index.lo, index.hi, folder)
            return {"key": found, "items": index.hi - index.lo, "cached": False}

    def _index(self, folder: str, key: str):
        index = self._indexes.get(key)
        if index is None:
            self.load(folder, key)
            index = self._indexes[key]
        return index

    def search_in_ids(self, folder: str, key: str, queries, sids, k: int | None = None):
        return self._index(folder, key).search_in_ids(queries, sids, k)

    def search(self, folder: str, key: str, queries, k: int, exclude=None):
        return self._index(folder, key).search(queries, k, exclude)


class HandleShard:
    """A :class:`~cobra_scale.serve.shards.ShardClient` over a shard deployment handle."""

    def __init__(self, handle, folder: str, key: str):
        self.handle, self.folder, self.key = handle, folder, key

    def submit(self, method: str, *args):
        return getattr(self.handle, method).remote(self.folder, self.key, *args)  # DeploymentResponse: .result()


# ----------------------------------------------------------------------------- recommender


WAITING_BATCHES = 256  # Serve batches a replica accepts at once: >= max_ongoing_requests, as each holds >= 1 request


class _BatchBoundFilter(logging.Filter):
    """Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests, reading it as
    concurrent model calls; here the batches merge (the coalescer), so the bound that matters is max_batch_size."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def _quiet_batch_bound_warning() -> None:
    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, _BatchBoundFilter) for f in serve_log.filters):  # once per process
        serve_log.addFilter(_BatchBoundFilter())


@serve.deployment(name="Recommender", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class RecommenderDeployment:
    """One model version: batched beam search + BeamFusion over the (sharded) index.

    Args:
        settings: the base :class:`Settings` (a dict); ``user_config`` keys override it.
        shards: handles of the index shard deployments (empty: an exact index in this replica).
    """

    def __init__(self, settings: dict, shards: list | None = None):
        loopback_replica_grpc()
        self.base = dict(settings)
        self.shards = list(shards or [])
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cobra-infer")  # model calls leave the event loop
        self.settings = Settings(**self.base)
        self.engine = self._load(self.settings)
        # Serve's batches that wait for the model merge into its next call (serve/coalesce.py), up to max_batch_size
        self.coalescer = Coalescer(_run_batches, self.pool, lambda: self.settings.max_batch_size)
        _quiet_batch_bound_warning()
        self._apply(self.settings)

    def _load(self, settings: Settings) -> ModelEngine:
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        factory = None
        if self.shards:
            from cobra_scale.serve.shards import ShardedIndex

            factory = lambda bundle: ShardedIndex([HandleShard(h, str(bundle.folder), bundle.key) for h in self.shards])  # noqa: E731
        engine = ModelEngine(settings.run, replica_device(settings.device), factory)
        log.info("recommender serving %s (%s)", settings.run, engine.default_version)
        return engine

    def _apply(self, settings: Settings) -> None:
        self.engine.set_max_per_id(settings.max_per_id)
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``user_config``: new defaults at once; a new ``run`` loads that model, then swaps."""
        new = Settings(**{**self.base, **(user_config or {})})
        if (new.run, new.device) != (self.settings.run, self.settings.device):
            engine = await asyncio.get_running_loop().run_in_executor(self.pool, self._load, new)
            # warm one replica of every shard before the swap (other replicas load on first use)
            await asyncio.gather(*(h.load.remote(str(engine.bundle.folder), engine.key) for h in self.shards))
            self.engine = engine
        elif new.threads and new.threads != self.settings.threads:
            import torch

            torch.set_num_threads(new.threads)
        self.settings = new
        self._apply(new)

    async def recommend(self, request: dict) -> dict:
        engine, settings = self.engine, self.settings  # one consistent version for this request
        try:
            prepared = engine.prepare(request, settings)
        except Refusal as r:
            return {"error": {"status": r.status, "detail": r.detail}}
        result = await self.infer((engine, prepared))
        if "error" not in result:
            result["model_version"] = settings.version or engine.default_version
        return result

    # Serve hands over a batch as soon as it is formed, even while the model is busy; letting many through
    # (max_concurrent_batches) lets them wait in the coalescer, which merges them, instead of running one by one.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=WAITING_BATCHES)
    async def infer(self, batch: list[tuple[ModelEngine, object]]) -> list[dict]:
        return await self.coalescer.submit(batch)

    async def info(self) -> dict:
        return {"version": self.settings.version or self.engine.default_version, "pid": os.getpid(), "shards": len(self.shards),
                "settings": self.settings.model_dump(), "batching": dict(self.coalescer.stats), **self.engine.info()}

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no model loaded")


def _run_batches(batch: list[tuple[ModelEngine, object]]) -> list[dict]:
    """Run a Serve batch; requests prepared before a model swap stay on their engine."""
    out: list[dict | None] = [None] * len(batch)
    by_engine: dict[int, list[int]] = {}
    for i, (engine, _) in enumerate(batch):
        by_engine.setdefault(id(engine), []).append(i)
    for rows in by_engine.values():
        engine = batch[rows[0]][0]
        try:
            results = engine.run_batch([batch[i][1] for i in rows])
        except Refusal as r:  # e.g. a shard on other weights mid-swap
            results = [{"error": {"status": r.status, "detail": r.detail}}] * len(rows)
        for i, res in zip(rows, results):
            out[i] = res
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- ingress


class HandleModel:
    """A :class:`~cobra_scale.serve.service.ModelClient` over a recommender deployment handle.

    A request whose replica dies mid-call is retried on another replica (``retries``
    times); after that the client gets 503 and may retry itself.
    """

    def __init__(self, handle, retries: int = 2):
        self.handle, self.retries = handle, retries

    async def _call(self, method: str, *args):
        from ray.exceptions import RayActorError

        for attempt in range(self.retries + 1):
            try:
                return await getattr(self.handle, method).remote(*args)
            except RayActorError as exc:
                log.warning("recommender replica lost during %s (attempt %d): %s", method, attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise ApiError(503, "model replicas unavailable (one was lost); retry")

    async def recommend(self, payload: dict) -> dict:
        return await self._call("recommend", payload)

    async def info(self) -> dict:
        return await self._call("info")


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class IngressDeployment:
    """HTTP JSON ingress over named recommender deployments (``models``: slot -> handle)."""

    def __init__(self, models: dict, default: str, limits: dict, history_table: str | None = None):
        loopback_replica_grpc()
        histories = HistoryTable.load(history_table) if history_table else None
        self.backend = ServiceBackend({name: HandleModel(h) for name, h in models.items()}, default, Limits(**limits), histories)

    def __serve_build_asgi_app__(self):
        return build_api(self.backend, self.backend.limits)


__all__ = ["HandleModel", "HandleShard", "IndexShardDeployment", "IngressDeployment", "RecommenderDeployment", "loopback_replica_grpc"]
