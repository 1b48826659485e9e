"""The ingress logic, without Ray: pick a model slot, resolve a user's history, ask, shape errors.

:class:`ServiceBackend` is the ``backend`` of :func:`~cobra_scale.serve.api.build_api`.
It holds *named model slots* (``{"default": client}``; each client is a Serve
deployment handle in production), so a router that splits traffic between model
versions (A/B) only has to override :meth:`ServiceBackend.choose_model`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cobra_scale.errors import DataError
from cobra_scale.serve.api import ApiError
from cobra_scale.serve.schemas import Limits

log = logging.getLogger(__name__)


class ModelClient(Protocol):
    async def recommend(self, payload: dict) -> dict: ...  # result dict, or {"error": {"status", "detail"}}

    async def info(self) -> dict: ...


class HistoryTable:
    """``user_id -> recent item ids`` from a Parquet table, held as sorted arrays (CSR).

    Reads an examples table (``history`` column, e.g. a split's ``test``) or a sequences
    table (``item_ids``). A user listed twice keeps the last row.
    """

    def __init__(self, user_ids: np.ndarray, offsets: np.ndarray, items: np.ndarray):
        self.user_ids, self.offsets, self.items = user_ids, offsets, items

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def load(cls, path: str | Path) -> "HistoryTable":
        import pyarrow as pa

        from cobra_scale.data.io import read_table

        table = read_table(path)
        column = "history" if "history" in table.column_names else "item_ids"
        if "user_id" not in table.column_names or column not in table.column_names:
            raise DataError(f"{path}: a history table needs user_id and history (examples) or item_ids (sequences)")
        col = table.column(column).combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
            raise DataError(f"{path}: column {column} must be a list of item ids")
        offsets = np.asarray(col.offsets, dtype=np.int64)
        values = np.asarray(col.values, dtype=np.int64)[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
        users = np.asarray(table.column("user_id"), dtype=np.int64)
        # stable sort, then keep the last row of each user
        order = np.argsort(users, kind="stable")
        sorted_users = users[order]
        last = np.r_[sorted_users[1:] != sorted_users[:-1], True]
        order, sorted_users = order[last], sorted_users[last]
        lengths = (offsets[1:] - offsets[:-1])[order]
        new_offsets = np.r_[0, np.cumsum(lengths)]
        # positions of the kept rows' items: each row's start, shifted into the new layout
        gather = np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths) + np.arange(int(new_offsets[-1]))
        return cls(sorted_users, new_offsets, values[gather])

    def lookup(self, user_id: int) -> list[int] | None:
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos >= len(self.user_ids) or self.user_ids[pos] != user_id:
            return None
        return self.items[self.offsets[pos] : self.offsets[pos + 1]].tolist()


class ServiceBackend:
    """Answers validated requests by asking a model slot.

    Args:
        models: slot name -> client (a deployment handle wrapper; see ``deployments.HandleModel``).
        default: the slot used when a request names none.
        limits: the request limits (also the length user histories are cut to).
        histories: user histories for ``user_id`` requests (optional).
    """

    def __init__(self, models: dict[str, ModelClient], default: str, limits: Limits, histories: HistoryTable | None = None, ready_timeout_s: float = 5.0):
        if default not in models:
            raise ValueError(f"default model slot {default!r} is not among {sorted(models)}")
        self.model_clients, self.default, self.limits, self.histories = models, default, limits, histories
        self.ready_timeout_s = ready_timeout_s

    def choose_model(self, request: Any) -> str:
        """The slot that answers ``request`` (an A/B router overrides this)."""
        return request.model or self.default

    async def recommend(self, request: Any) -> dict:
        name = self.choose_model(request)
        client = self.model_clients.get(name)
        if client is None:
            raise ApiError(404, f"model: no model slot named {name!r} (serving: {', '.join(sorted(self.model_clients))})")
        payload = request.model_dump(exclude_none=True, exclude={"user_id", "model"})
        if request.user_id is not None:
            if self.histories is None:
                raise ApiError(422, "user_id: this server has no history table (start it with history_table=...); send 'items' instead")
            items = self.histories.lookup(request.user_id)
            if not items:
                raise ApiError(404, f"user_id: no history for user {request.user_id}")
            payload["items"] = items[-self.limits.max_history :]
            payload["truncate"] = True  # a stored history may be longer than the model's window
        result = await client.recommend(payload)
        if "error" in result:
            raise ApiError(int(result["error"]["status"]), str(result["error"]["detail"]))
        result["model"] = name
        return result

    async def _infos(self) -> dict[str, dict]:
        async def one(name: str, client: ModelClient) -> tuple[str, dict]:
            try:
                return name, {"ready": True, **await asyncio.wait_for(client.info(), self.ready_timeout_s)}
            except Exception as exc:  # a dead or loading replica: not ready, say why
                return name, {"ready": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}

        pairs = await asyncio.gather(*(one(n, c) for n, c in self.model_clients.items()))
        return dict(pairs)

    async def ready(self) -> dict:
        infos = await self._infos()
        return {"ready": all(i["ready"] for i in infos.values()), "models": infos}

    async def models(self) -> dict:
        return {"default": self.default, "models": await self._infos(), "limits": self.limits.__dict__}


__all__ = ["HistoryTable", "ModelClient", "ServiceBackend"]
