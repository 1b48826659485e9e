"""History -> top-K items, in every inference mode of the paper and its ablations.

Modes:

* ``cobra``       beam search (M IDs) -> dense vector per ID -> items of each ID -> BeamFusion
* ``no_fusion``   "w/o BeamFusion": the top-1 beam's dense vector, nearest neighbours over all items
* ``dense_only``  "w/o ID": a model trained without codes; its dense prediction, nearest neighbours
* ``sparse_only`` "w/o Dense" (TIGER-like): beams over IDs fine enough to name one item; beam order
* ``liger``       LIGER's inference (arXiv 2411.18814): the items of the top M beam IDs plus the
                  cold-start items (``cold_items``), all ranked by cosine with the dense vector
                  predicted for the top beam

Item indices are positions in the catalogue (0..N-1); histories are left-padded with -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cobra_scale.model.beam import PrefixMasks, beam_fusion, beam_search
from cobra_scale.model.cobra import CobraModel
from cobra_scale.retrieve.exact import ExactIdIndex

MODES = ("cobra", "no_fusion", "dense_only", "sparse_only", "liger")


@dataclass
class InferenceParams:
    mode: str = "cobra"
    beams: int = 20  # M
    tau: float = 1.0  # BeamFusion temperature on beam scores
    psi: float = 20.0  # BeamFusion temperature on cosine
    normalize: str = "per_beam"  # BeamFusion's cosine softmax: "per_beam" (P(ID) x P(item | ID)) | "global"
    exclude_history: bool = False  # mask the user's own history items from the ranking
    prior_weight: float = 0.0  # cobra mode: weight of the transition prior mixed into BeamFusion (retrieve/prior.py; 0 = the paper)
    prior_candidates: int = 200  # the prior's top items that join COBRA's candidates when prior_weight > 0
    # cobra mode: weight w of the model's ID-free dense vector in each beam's query, normalize((1-w) v(ID) + w v_free)
    # (Beams.query; 0 = the paper's vector for that ID; needs a model trained with model.history_dense_weight > 0)
    free_query_weight: float = 0.0
    # cobra mode: weight λ of the same model's ID-free ranking mixed into BeamFusion, (1-λ) p_BeamFusion + λ p_free, where
    # p_free = softmax(ψ cos(v_free, item)) over v_free's top free_mix_candidates items (0 = the list's k); 0 = the paper
    free_mix_weight: float = 0.0
    free_mix_candidates: int = 0


class Recommender:
    """Runs inference for a trained model over a catalogue.

    Args:
        model: a CobraModel (eval mode is set here).
        item_codes: (N, L) long codes of every catalogue item.
        item_vectors: (N, d) dense vectors of every item (from ``model.encode_items``).
        index: an index over the item vectors keyed by packed ID (default: exact, in memory).
        prior: an item-to-item :class:`~cobra_scale.retrieve.prior.TransitionPrior` over the same
            catalogue, mixed into the cobra mode's ranking when ``InferenceParams.prior_weight > 0``.
        max_per_id: candidates per beam's ID of the default in-memory index (0 = all; see
            :class:`~cobra_scale.retrieve.exact.ExactIdIndex`).
    """

    def __init__(
        self,
        model: CobraModel,
        item_codes: torch.Tensor,
        item_vectors: torch.Tensor | None,
        index: ExactIdIndex | None = None,
        cold_items: torch.Tensor | None = None,
        prior=None,
        max_per_id: int = 0,
    ):
        self.model = model.eval()
        if prior is not None and prior.spec.items != len(item_codes):
            raise ValueError(f"the transition prior covers {prior.spec.items} items, the catalogue {len(item_codes)}")
        self.prior = prior
        self.cold_items = cold_items  # (Nc,) catalogue indices of items unseen in training (LIGER mode)
        self.codes = item_codes
        self.vectors = item_vectors
        k = model.cfg.codes
        dev = item_codes.device  # everything the search builds lives there (the model's device: the engine moves both)
        sids = torch.zeros(len(item_codes), dtype=torch.long, device=dev)
        for level in range(item_codes.shape[1]):
            sids = sids * k + item_codes[:, level]
        self.sids = sids
        self.sids_host = sids.cpu().numpy()  # the same on the host, for metrics (one copy, not one per batch)
        self.diversity_sids = None  # (N,) int64 numpy array: the IDs diversity@K counts, when not these (eval's diversity_ids)
        self.masks = PrefixMasks(item_codes.cpu().numpy(), k, device=dev) if model.cfg.use_sparse else None
        if index is None and item_vectors is not None:
            index = ExactIdIndex(item_vectors, sids, max_per_id)
        self.index = index
        self.sid_to_item = None
        if model.cfg.use_sparse and not model.cfg.use_dense:
            uniq, counts = torch.unique(sids, return_counts=True)
            if int(counts.max()) > 1:
                raise ValueError("sparse_only needs IDs that name one item each (add a dedup level to the codes)")
            self.sid_to_item = ExactIdIndex(torch.zeros(len(sids), 1, device=dev), sids)

    def _history_inputs(self, history: torch.Tensor):
        valid = history >= 0
        idx = history.clamp(min=0)
        codes = self.codes[idx]
        vectors = self.vectors[idx] if (self.vectors is not None and self.model.cfg.use_dense) else None
        return codes, vectors, valid

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int, params: InferenceParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``history`` (B, S) catalogue indices, -1 left padding -> ``(items (B, k), scores (B, k))``.

        Rows with fewer than ``k`` candidates are padded with item -1 and score -inf. ``history`` may lie on any
        device; the answer lies on the recommender's (its item codes', the model's: CUDA when the caller put them there).
        """
        mode = params.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sparse_only" and self.sid_to_item is None:
            raise ValueError("mode sparse_only needs a model trained w/o Dense on item-unique IDs (model.use_dense=false dedup_level=true)")
        if mode in ("cobra", "no_fusion", "dense_only", "liger") and self.index is None:
            raise ValueError(f"mode {mode} needs dense item vectors; this model was trained without them (use sparse_only)")
        self._check_prior(params)
        self._check_free_query(params)
        history = history.to(self.codes.device)  # results come back on the model's device
        codes, vectors, valid = self._history_inputs(history)
        exclude = history if params.exclude_history else None
        if mode == "dense_only":
            h, _, _ = self.model.start(codes, vectors, valid)
            return self._search(self.model.dense_prediction(self.model.with_successor(h, history, dense=True)), k, exclude, history)
        beams = beam_search(
            self.model, codes, vectors, valid, self.masks, params.beams if mode != "no_fusion" else 1, with_dense=mode != "sparse_only", last_items=history,
            free_query=_needs_free(params),
        )
        b, m = beams.scores.shape
        if mode == "no_fusion":
            return self._search(beams.dense[:, 0], k, exclude, history)
        if mode == "liger":
            return self._liger(beams, k, exclude)
        if mode == "sparse_only":
            return self._sparse_ranking(beams, k, exclude)
        candidates = self._cobra_candidates(beams, params.free_query_weight)
        free_top = self._free_top(beams, history, k, [params])
        return self._fuse(self._exclude(candidates, exclude), k, params, self._prior_top(history, [params]), exclude,
                          self.model.history_item_offsets(candidates[1], history), free_top)

    def _check_prior(self, params: InferenceParams) -> None:
        if not 0 <= params.prior_weight <= 1:
            raise ValueError(f"prior_weight must lie in [0, 1], got {params.prior_weight}")
        if params.prior_weight > 0:
            if params.mode != "cobra":
                raise ValueError(f"prior_weight applies to mode cobra, not {params.mode}")
            if self.prior is None:
                raise ValueError("prior_weight > 0 needs a transition prior (build one with `cobra prior --run RUN`)")
            if params.prior_candidates < 1:
                raise ValueError("prior_candidates must be >= 1")

    def _check_free_query(self, params: InferenceParams) -> None:
        if params.free_mix_candidates < 0:
            raise ValueError(f"free_mix_candidates must be >= 0 (0 = the list's k), got {params.free_mix_candidates}")
        for name in ("free_query_weight", "free_mix_weight"):
            weight = getattr(params, name)
            if not 0 <= weight <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {weight}")
            if weight > 0:
                if params.mode != "cobra":
                    raise ValueError(f"{name} applies to mode cobra, not {params.mode}")
                if not self.model.cfg.history_dense_weight > 0:
                    raise ValueError(f"{name} > 0 needs a model trained with model.history_dense_weight > 0 "
                                     "(its ID-free dense vector is otherwise untrained)")

    def _free_top(self, beams, history: torch.Tensor, k: int, settings: list[InferenceParams]):
        """The ID-free vector's nearest items over the catalogue, ``(items (B, C'), cos (B, C'))`` best first, for the
        largest ``free_mix_candidates`` asked (0 = ``k``) plus room for the history items a masked setting drops; None
        when no setting mixes it in."""
        want = [p.free_mix_candidates or k for p in settings if p.free_mix_weight > 0]
        if not want:
            return None
        extra = history.shape[1] if any(p.exclude_history for p in settings if p.free_mix_weight > 0) else 0
        return self._search(beams.free, max(want) + extra, None, history)

    @staticmethod
    def _free_distribution(free_top, k: int, params: InferenceParams, exclude: torch.Tensor | None):
        """``(items (B, C), p (B, C))``: softmax(ψ·cos) over the ID-free vector's top C = ``free_mix_candidates``
        (0 = ``k``) items, the history items of ``exclude`` removed first (item -1 / p 0 where a row has fewer)."""
        items, cos = free_top
        cos = cos.float().masked_fill(items < 0, float("-inf"))
        if exclude is not None:
            hit = ((items[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1)
            cos = cos.masked_fill(hit, float("-inf"))
        c = min(params.free_mix_candidates or k, cos.shape[1])
        top, pos = cos.topk(c, dim=-1)
        items = items.gather(1, pos).masked_fill(~torch.isfinite(top), -1)
        p = torch.softmax(params.psi * top, dim=-1).nan_to_num(0.0)  # a row with no finite cosine has no distribution
        return items, p.masked_fill(items < 0, 0.0)

    def _prior_top(self, history: torch.Tensor, settings: list[InferenceParams]):
        """The prior's top items of each user (items, p), for the largest ``prior_candidates`` asked, or None."""
        want = [p.prior_candidates for p in settings if p.prior_weight > 0]
        return self.prior.top(history, max(want)) if want else None

    def _sparse_ranking(self, beams, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """w/o Dense: each beam's ID names one item; items in beam order."""
        b, m = beams.scores.shape
        items = self.sid_to_item.bucket_items(beams.sids.view(-1)).view(b, m, -1)[:, :, 0]  # (B, M)
        scores = beams.scores.masked_fill(items < 0, float("-inf"))
        if exclude is not None:
            hit = (items[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)
            scores = scores.masked_fill(hit.any(-1), float("-inf"))
        return _topk_padded(items, scores, k)

    def _cobra_candidates(self, beams, free_query_weight: float = 0.0):
        """Candidates of every beam's ID and their cosine with that beam's query (:meth:`Beams.query`): (B, M, C) each."""
        b, m = beams.scores.shape
        cand, cos = self.index.search_in_ids(beams.query(free_query_weight).reshape(b * m, -1), beams.sids.view(-1))
        cand, cos = cand.view(b, m, -1), cos.view(b, m, -1)
        cos = cos.masked_fill(~torch.isfinite(beams.scores)[:, :, None], float("-inf"))
        return beams.scores, cand, cos

    def _search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None, history: torch.Tensor):
        """Nearest items of ``queries`` (B, d) over the catalogue, with the model's ``dense_repeat_bias``: the
        index's top ``k + S`` (so that k non-history items remain) with the history items re-scored exactly."""
        if getattr(self.model, "dense_repeat", None) is None:
            return self.index.search(queries, k, exclude)
        b, s = history.shape
        items, cos = self.index.search(queries, k + s, exclude)
        in_hist = ((items[:, :, None] == history[:, None, :]) & (history[:, None, :] >= 0)).any(-1)
        cos = cos.masked_fill(in_hist | (items < 0), float("-inf"))
        h_cos = F.normalize(queries.float(), dim=-1)[:, None, :].mul(F.normalize(self.vectors[history.clamp(min=0)].float(), dim=-1)).sum(-1)
        h_cos = h_cos + self.model.history_item_offsets(history, history)
        # each history item once (its most recent column; the offsets already are the most recent occurrence's)
        later = (history[:, :, None] == history[:, None, :]) & torch.triu(torch.ones(s, s, dtype=torch.bool, device=history.device), 1)
        drop = (history < 0) | later.any(-1)
        if exclude is not None:
            drop |= ((history[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1)
        h_cos = h_cos.masked_fill(drop, float("-inf"))
        return _topk_padded(torch.cat([items, history], 1), torch.cat([cos.to(h_cos.dtype), h_cos], 1), k)

    @staticmethod
    def _exclude(candidates, exclude: torch.Tensor | None):
        """Candidates with the items of ``exclude`` (B, H) (-1 padded) scored -inf."""
        if exclude is None:
            return candidates
        beam_scores, cand, cos = candidates
        hit = (cand[:, :, :, None] == exclude[:, None, None, :]) & (exclude[:, None, None, :] >= 0)
        return beam_scores, cand, cos.masked_fill(hit.any(-1), float("-inf"))

    @classmethod
    def _fuse(
        cls, candidates, k: int, params: InferenceParams, prior_top=None, exclude: torch.Tensor | None = None, shift: torch.Tensor | None = None,
        free_top=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BeamFusion of :meth:`_cobra_candidates` (with the model's ``dense_repeat_bias`` ``shift``, :meth:`CobraModel.history_item_offsets`), top ``k``; mixed
        with the prior's ``prior_top`` (items, p) when ``params.prior_weight > 0``, then with the ID-free ranking
        ``free_top`` (:meth:`_free_top`) when ``params.free_mix_weight > 0`` (history items of ``exclude`` removed from all)."""
        beam_scores, cand, cos = candidates
        b = cand.shape[0]
        fused = beam_fusion(beam_scores, cos, params.tau, params.psi, params.normalize, shift)
        fused = fused.masked_fill(~torch.isfinite(cos), float("-inf"))
        items, scores = cand.view(b, -1), fused.view(b, -1)
        if params.prior_weight > 0:
            from cobra_scale.retrieve.prior import mix

            p_items, p = prior_top[0][:, : params.prior_candidates], prior_top[1][:, : params.prior_candidates]
            if exclude is not None:
                hit = ((p_items[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1)
                p_items = p_items.masked_fill(hit, -1)
            items, scores = mix(items, scores, p_items, p.to(scores.dtype), params.prior_weight)
        if params.free_mix_weight > 0:
            from cobra_scale.retrieve.prior import mix

            f_items, f_p = cls._free_distribution(free_top, k, params, exclude)
            items, scores = mix(items, scores, f_items, f_p.to(scores.dtype), params.free_mix_weight)
        return _topk_padded(items, scores, k)

    @torch.no_grad()
    def recommend_many(self, history: torch.Tensor, k: int, settings: list[InferenceParams]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`recommend` for several settings of the same users, in order.

        COBRA (or w/o Dense) settings with the same number of beams share one beam search
        and one candidate search (the expensive parts; history masking only removes
        candidates); the results equal separate :meth:`recommend` calls.
        """
        out: list = [None] * len(settings)
        shared: dict[tuple[str, int], list[int]] = {}
        for p in settings:
            self._check_prior(p)
            self._check_free_query(p)
        history = history.to(self.codes.device)
        prior_top = self._prior_top(history, settings)
        for i, p in enumerate(settings):
            if (p.mode == "cobra" and self.index is not None) or (p.mode == "sparse_only" and self.sid_to_item is not None):
                shared.setdefault((p.mode, p.beams), []).append(i)
            else:
                out[i] = self.recommend(history, k, p)
        codes, vectors, valid = self._history_inputs(history) if shared else (None, None, None)
        for (mode, beams_m), members in shared.items():
            free = any(_needs_free(settings[i]) for i in members)
            beams = beam_search(self.model, codes, vectors, valid, self.masks, beams_m, with_dense=mode == "cobra", last_items=history, free_query=free)
            if mode == "sparse_only":
                for i in members:
                    out[i] = self._sparse_ranking(beams, k, history if settings[i].exclude_history else None)
                continue
            free_top = self._free_top(beams, history, k, [settings[i] for i in members]) if mode == "cobra" else None
            by_query: dict[float, list[int]] = {}  # one candidate search per query (free_query_weight)
            for i in members:
                by_query.setdefault(settings[i].free_query_weight, []).append(i)
            for weight, group in by_query.items():
                candidates = self._cobra_candidates(beams, weight)
                shift = self.model.history_item_offsets(candidates[1], history)  # dense_repeat_bias, or None
                for i in group:
                    exclude = history if settings[i].exclude_history else None
                    out[i] = self._fuse(self._exclude(candidates, exclude), k, settings[i], prior_top, exclude, shift, free_top)
        return out

    def _liger(self, beams, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items of the M beam IDs plus the cold-start items, by cosine with the top beam's vector."""
        b, m = beams.scores.shape
        query = beams.dense[:, 0]  # (B, d)
        cand, cos = self.index.search_in_ids(query[:, None].expand(b, m, query.shape[-1]).reshape(b * m, -1), beams.sids.view(-1))
        cand, cos = cand.view(b, -1), cos.view(b, m, -1)
        cos = cos.masked_fill(~torch.isfinite(beams.scores)[:, :, None], float("-inf")).view(b, -1)
        cold = self.cold_items
        if cold is not None and len(cold):
            cold = cold.to(cand.device)
            is_cold = torch.zeros(len(self.codes), dtype=torch.bool, device=cand.device)
            is_cold[cold] = True
            cos = cos.masked_fill(is_cold[cand.clamp(min=0)] & (cand >= 0), float("-inf"))  # scored once, below
            cold_cos = F.normalize(query.float(), dim=-1) @ F.normalize(self.vectors[cold].float(), dim=-1).T  # (B, Nc)
            cand = torch.cat([cand, cold[None].expand(b, -1)], 1)
            cos = torch.cat([cos, cold_cos], 1)
        if exclude is not None:
            hit = (cand[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)
            cos = cos.masked_fill(hit.any(-1), float("-inf"))
        return _topk_padded(cand, cos, k)


def _needs_free(params: InferenceParams) -> bool:
    """Whether a setting reads the model's ID-free vector (``Beams.free``)."""
    return params.free_query_weight > 0 or params.free_mix_weight > 0


def _topk_padded(items: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of (B, C) candidates, padded to k columns with item -1 / score -inf."""
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1)
        items = torch.cat([items, items.new_full((items.shape[0], pad), -1)], 1)
    top, pos = scores.topk(k, dim=-1)
    chosen = items.gather(1, pos)
    return chosen.masked_fill(~torch.isfinite(top), -1), top


__all__ = ["InferenceParams", "MODES", "Recommender"]
