"""The model side of the service, without Ray: load a run, check a request, run a batch.

:class:`ModelEngine` is what one recommender replica holds. ``prepare`` turns one
request into catalogue indices and inference parameters (or a :class:`Refusal` with a
4xx status); ``run_batch`` runs many prepared requests through the
:class:`~cobra_scale.retrieve.recommender.Recommender` at once — grouped by their
inference parameters, one batched beam search per group.

:class:`Settings` is the recommender deployment's ``user_config``: inference defaults,
batching, and the run (model version) it serves; changing it reconfigures a live replica.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cobra_scale.retrieve.recommender import InferenceParams, Recommender
from cobra_scale.serve.bundle import Bundle, ensure_bundle, load_bundle

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A request the model cannot answer because of its content (4xx) or state (503)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Settings(BaseModel):
    """The recommender deployment's ``user_config`` (every key optional over the app's defaults)."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(description="run folder of `cobra train` (serves run/best); change it to swap the model version")
    version: Optional[str] = Field(None, description="version label (default: <run name>@<weights sha256[:8]>)")
    mode: Literal["cobra", "no_fusion", "dense_only", "sparse_only"] = "cobra"
    beams: int = Field(20, ge=1, description="M, default beams per request")
    tau: float = Field(1.0, gt=0, allow_inf_nan=False)
    psi: float = Field(20.0, gt=0, allow_inf_nan=False)
    normalize: Literal["global", "per_beam"] = "per_beam"
    exclude_history: bool = False
    prior_weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                description="mode cobra: weight of the run's transition prior (`cobra prior`) mixed into BeamFusion; 0 = the paper's COBRA")
    free_query_weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                     description="mode cobra: weight of the model's ID-free dense vector in each beam's query inside its ID "
                                     "(a model trained with model.history_dense_weight > 0); 0 = the paper's COBRA")
    free_mix_weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                   description="mode cobra: weight of the model's ID-free ranking mixed into BeamFusion (a model trained "
                                   "with model.history_dense_weight > 0); 0 = the paper's COBRA")
    free_mix_candidates: int = Field(0, ge=0, le=100_000, description="the ID-free ranking's top items the mixture adds (0 = the request's k)")
    max_per_id: int = Field(0, ge=0, description="candidates per beam's ID scored by BeamFusion: the best N by cosine (0 = every item of the "
                            "ID); the app's default is the run's inference.max_per_id, as `cobra eval` uses it")
    max_batch_size: int = Field(32, ge=1, description="requests per batched beam search (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch default)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class Prepared:
    """One validated request, ready for batching."""

    history: np.ndarray  # (S,) catalogue indices, oldest first, S <= max_history
    k: int
    params: InferenceParams


def available_modes(use_sparse: bool, use_dense: bool) -> tuple[str, ...]:
    if use_sparse and use_dense:
        return ("cobra", "no_fusion")
    if use_dense:
        return ("dense_only",)
    return ("sparse_only",)


class ModelEngine:
    """A trained run, ready to answer requests.

    Args:
        run: run folder (``config.yaml``, ``best/model.safetensors``); its serving bundle
            is built on first use (see :mod:`cobra_scale.serve.bundle`).
        device: ``auto`` | ``cpu`` | ``cuda``.
        index_factory: ``bundle -> index`` (e.g. a :class:`~cobra_scale.serve.shards.ShardedIndex`
            over shard deployments); ``None`` keeps an exact index in this process.
    """

    def __init__(self, run: str | Path, device: str = "auto", index_factory: Callable[[Bundle], object] | None = None):
        from cobra_scale.config import load_config
        from cobra_scale.devices import pick_device
        from cobra_scale.model.cobra import CobraModel
        from cobra_scale.train.configs import TrainConfig
        from cobra_scale.train.trainer import load_weights

        self.run = Path(run)
        cfg = load_config(TrainConfig, self.run / "config.yaml")
        self.device = torch.device(pick_device(device))
        self.bundle = load_bundle(ensure_bundle(self.run))
        model = CobraModel(cfg.model).to(self.device)
        load_weights(model, self.run / "best")
        vectors = self.bundle.vectors.to(self.device) if (cfg.model.use_dense and self.bundle.vectors is not None) else None
        index = index_factory(self.bundle) if (index_factory is not None and vectors is not None) else None
        from cobra_scale.retrieve.prior import load_or_build

        prior = load_or_build(self.run, self.bundle.item_ids, build=False)
        self.recommender = Recommender(model, self.bundle.codes.to(self.device), vectors, index, prior=prior)
        self.max_history = cfg.model.max_items - 1
        self.modes = available_modes(cfg.model.use_sparse, cfg.model.use_dense)
        self.key = self.bundle.key
        self.default_version = f"{self.run.name}@{self.key[:8]}"

    def set_max_per_id(self, n: int) -> None:
        """Candidates per beam's ID (0 = all) of this engine's index, local or sharded."""
        index = self.recommender.index
        if index is not None:
            index.max_per_id = int(n)

    # ------------------------------------------------------------------ per request

    def prepare(self, request: dict, settings: Settings) -> Prepared:
        """Check one request against this model; raise :class:`Refusal` (4xx) when it cannot be served."""
        ids = np.asarray(request.get("items") or [], dtype=np.int64)
        stored = bool(request.get("truncate"))  # a history the server looked up, not one the client sent
        if not stored and len(ids) > self.max_history:
            raise Refusal(422, f"items: {len(ids)} history items, this model reads at most {self.max_history} (send the most recent)")
        idx = self.bundle.index_of(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        if (idx < 0).any():
            if not stored:
                unknown = ids[idx < 0]
                shown = ", ".join(str(i) for i in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise Refusal(422, f"items: {len(unknown)} unknown item id(s) not in the catalogue: {shown}")
            idx = idx[idx >= 0]  # stored histories may hold items this model's catalogue lacks
        idx = idx[-self.max_history :]
        if not len(idx):
            raise Refusal(422, "items: no history item of this model's catalogue")

        def pick(name: str):
            value = request.get(name)
            return getattr(settings, name) if value is None else value

        mode = pick("mode")
        if mode not in self.modes:
            raise Refusal(422, f"mode: {mode!r} is not available for this model (available: {', '.join(self.modes)})")
        weight = settings.prior_weight if mode == "cobra" else 0.0
        if weight > 0 and self.recommender.prior is None:
            raise Refusal(503, f"prior_weight is {weight} but the served run has no transition prior (build it: `cobra prior --run {self.run}`)")
        free = settings.free_query_weight if mode == "cobra" else 0.0
        free_mix = settings.free_mix_weight if mode == "cobra" else 0.0
        for name, value in (("free_query_weight", free), ("free_mix_weight", free_mix)):
            if value > 0 and not self.recommender.model.cfg.history_dense_weight > 0:
                raise Refusal(503, f"{name} is {value} but the served model was trained without model.history_dense_weight "
                                   f"(its ID-free dense vector is untrained): set {name} to 0 in the deployment's user_config")
        params = InferenceParams(mode, int(pick("beams")), float(pick("tau")), float(pick("psi")), settings.normalize, bool(pick("exclude_history")), weight,
                                 free_query_weight=free, free_mix_weight=free_mix, free_mix_candidates=settings.free_mix_candidates)
        return Prepared(idx, int(request.get("k", 10)), params)

    # ------------------------------------------------------------------ batched

    @torch.no_grad()
    def run_batch(self, batch: list[Prepared]) -> list[dict]:
        """Answer many prepared requests; one batched beam search per distinct parameter set."""
        out: list[dict | None] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(astuple(p.params), []).append(i)
        for rows in groups.values():
            params = batch[rows[0]].params
            k = max(batch[i].k for i in rows)
            history = torch.full((len(rows), self.max_history), -1, dtype=torch.long)
            for r, i in enumerate(rows):
                h = torch.from_numpy(batch[i].history)
                history[r, self.max_history - len(h) :] = h
            items, scores = self.recommender.recommend(history.to(self.device), k, params)
            items, scores = items.cpu(), scores.float().cpu()
            for r, i in enumerate(rows):
                out[i] = self._answer(items[r, : batch[i].k], scores[r, : batch[i].k], batch[i])
        return out  # type: ignore[return-value]

    def _answer(self, items: torch.Tensor, scores: torch.Tensor, req: Prepared) -> dict:
        keep = (items >= 0) & torch.isfinite(scores)
        items, scores = items[keep], scores[keep]
        codes = self.bundle.codes[items].tolist()
        ids = self.bundle.item_ids[items.numpy()].tolist()
        p = req.params
        return {
            "items": [{"item_id": int(i), "score": float(s), "sid": c} for i, s, c in zip(ids, scores.tolist(), codes)],
            "mode": p.mode,
            "k": req.k,
            "beams": p.beams,
            "tau": p.tau,
            "psi": p.psi,
            "prior_weight": p.prior_weight,
            "free_query_weight": p.free_query_weight,
            "free_mix_weight": p.free_mix_weight,
            "history_length": int(len(req.history)),
        }

    def info(self) -> dict:
        return {
            "run": str(self.run),
            "key": self.key,
            "items": len(self.bundle),
            "max_history": self.max_history,
            "modes": list(self.modes),
            "device": str(self.device),
            "prior": self.recommender.prior is not None,
        }


__all__ = ["ModelEngine", "Prepared", "Refusal", "Settings", "available_modes"]
