"""An item-to-item transition prior, to mix into COBRA's ranking (an option beyond the paper).

The prior counts, over the training sequences, how often item b follows item a within
``window`` steps. A user's prior is the counts out of their last ``context`` history items,
the most recent weighted 1, the one before ``decay``, then ``decay**2`` ..., normalised to
a distribution over the catalogue (a user whose last items have no recorded successor gets
none). The Recommender mixes it with BeamFusion, whose per-beam scores are a distribution
too (``InferenceParams.prior_weight`` = λ):

    p(item) = (1 - λ) · p_BeamFusion(item) + λ · p_prior(item)

over the union of COBRA's candidates and the prior's top ``candidates`` items. λ = 0 is the
paper's COBRA. On Beauty this is the mixture ``tools/fuse_transitions.py`` measured
(docs/model.md, session 16); it is a hybrid of two models, reported apart from COBRA.

Stored as ``prior.safetensors`` (the CSR arrays) + ``prior.json`` (how it was built), in a
run folder's ``prior/`` (built by ``cobra eval`` when a prior weight is asked for).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from cobra_scale.errors import DataError

FILE, META = "prior.safetensors", "prior.json"


def transition_matrix(values: np.ndarray, offsets: np.ndarray, n: int, window: int, both: bool = False, normalise: bool = False) -> sp.csr_matrix:
    """(n+1, n+1) counts of index b following index a within ``window`` steps (+ preceding if ``both``).

    ``values`` are the concatenated sequences (indices 1..n; 0 is kept for padding) and
    ``offsets`` their start positions (len = sequences + 1). ``normalise`` divides each row
    by its total.
    """
    rows, cols = [], []
    seq_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    for d in range(1, window + 1):
        same = seq_of[:-d] == seq_of[d:] if len(values) > d else np.zeros(0, bool)
        a, b = values[:-d][same], values[d:][same]
        rows.append(a)
        cols.append(b)
        if both:
            rows.append(b)
            cols.append(a)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n + 1, n + 1))
    m.sum_duplicates()
    if normalise:
        deg = np.asarray(m.sum(axis=1)).ravel()
        m = sp.diags(np.where(deg > 0, 1.0 / np.maximum(deg, 1e-12), 0.0).astype(np.float32)) @ m
    return m.tocsr()


def history_query(histories: np.ndarray, n_rows: int, context: int, decay: float) -> sp.csr_matrix:
    """(B, n_rows) sparse weights of each row's last ``context`` indices (0 = padding), the most recent 1, then ``decay``, ..."""
    h = histories[:, -context:]
    weights = (decay ** np.arange(h.shape[1]))[::-1].astype(np.float32)  # oldest .. most recent
    w = np.broadcast_to(weights, h.shape) * (h > 0)
    rows = np.repeat(np.arange(len(h)), h.shape[1])
    return sp.csr_matrix((w.ravel(), (rows, h.ravel())), shape=(len(h), n_rows))


def history_scores(matrix: sp.csr_matrix, histories: np.ndarray, context: int, decay: float) -> np.ndarray:
    """(B, n) float32 transition counts out of each row's last ``context`` indices (0 = padding),
    the most recent weighted 1, the one before ``decay``, ...; column j is index j + 1."""
    return (history_query(histories, matrix.shape[0], context, decay) @ matrix).toarray()[:, 1:].astype(np.float32)


@dataclass
class PriorSpec:
    """How a :class:`TransitionPrior` was built (``prior.json``)."""

    items: int
    window: int = 3
    context: int = 3
    decay: float = 0.3
    sequences: int = 0
    source: str = ""
    catalogue_sha256: str = ""  # of the catalogue's sorted item ids: a prior only serves the catalogue it counted


def catalogue_key(item_ids: np.ndarray) -> str:
    """sha256 of a catalogue's item ids (int64, in catalogue order)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes()).hexdigest()


class TransitionPrior:
    """Item-to-item transition counts over a catalogue of ``spec.items`` items (catalogue indices)."""

    def __init__(self, matrix: sp.csr_matrix, spec: PriorSpec, popularity: np.ndarray | None = None):
        if matrix.shape != (spec.items + 1, spec.items + 1):
            raise DataError(f"transition matrix of shape {matrix.shape} does not fit {spec.items} items (+1 padding row)")
        if spec.window < 1 or spec.context < 1 or not 0 < spec.decay <= 1:
            raise DataError(f"prior needs window >= 1, context >= 1 and decay in (0, 1]; got {spec}")
        popularity = np.zeros(spec.items, np.float32) if popularity is None else np.asarray(popularity, np.float32).reshape(-1)
        if len(popularity) != spec.items:
            raise DataError(f"popularity has {len(popularity)} entries, the prior {spec.items} items")
        self.matrix, self.spec, self.popularity = matrix.tocsr(), spec, popularity  # popularity: training count, breaks ties

    @classmethod
    def from_sequences(cls, sequences: list[np.ndarray], items: int, window: int = 3, context: int = 3, decay: float = 0.3,
                       source: str = "", catalogue_sha256: str = "") -> "TransitionPrior":
        """Count the transitions of ``sequences`` (arrays of catalogue indices 0..items-1)."""
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        values = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        if len(values) and (values.min() < 0 or values.max() >= items):
            raise DataError(f"sequences hold indices outside the catalogue of {items} items")
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        spec = PriorSpec(items, window, context, decay, len(seqs), source, catalogue_sha256)
        return cls(transition_matrix(values + 1, offsets, items, window), spec, np.bincount(values, minlength=items))

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = self.matrix
        save_file({"indptr": m.indptr.astype(np.int64), "indices": m.indices.astype(np.int64), "data": m.data.astype(np.float32),
                   "popularity": self.popularity}, str(folder / FILE))
        (folder / META).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TransitionPrior":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / FILE).is_file() or not (folder / META).is_file():
            raise DataError(f"{folder} holds no transition prior ({FILE} + {META})")
        try:
            meta = json.loads((folder / META).read_text())
            spec = PriorSpec(**meta)
            t = load_file(str(folder / FILE))
            n = spec.items + 1
            if t["indices"].size and (t["indices"].min() < 0 or t["indices"].max() >= n):
                raise DataError(f"{folder}: transition prior indices outside its {spec.items} items")
            matrix = sp.csr_matrix((t["data"], t["indices"], t["indptr"]), shape=(n, n))
            popularity = t["popularity"]
        except (json.JSONDecodeError, TypeError, KeyError, ValueError, SafetensorError, OSError) as exc:
            raise DataError(f"{folder}: unreadable transition prior: {exc}") from exc
        return cls(matrix, spec, popularity)

    def top(self, history: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``history`` (B, S) catalogue indices (-1 padding) -> the prior's top ``candidates`` items
        ``(items (B, C), p (B, C))``, p normalised over all of the user's nonzero counts, equal
        counts in order of training popularity; rows with fewer nonzero items are padded with
        item -1 and p 0."""
        h = history.detach().cpu().numpy().astype(np.int64) + 1  # matrix rows are index + 1
        if h.size and h.max() > self.spec.items:
            raise ValueError(f"history holds items beyond the prior's {self.spec.items}")
        q = history_query(h, self.matrix.shape[0], self.spec.context, self.spec.decay) @ self.matrix  # (B, n+1) sparse
        q = q.tocsr()
        b = len(h)
        items = np.full((b, candidates), -1, dtype=np.int64)
        p = np.zeros((b, candidates), dtype=np.float32)
        for row in range(b):
            lo, hi = q.indptr[row], q.indptr[row + 1]
            if hi == lo:
                continue
            cols, vals = q.indices[lo:hi], q.data[lo:hi]
            total = float(vals.sum())
            keep = np.lexsort((-self.popularity[cols - 1], -vals))[:candidates]
            items[row, : len(keep)] = cols[keep] - 1
            p[row, : len(keep)] = vals[keep] / total
        return torch.from_numpy(items).to(history.device), torch.from_numpy(p).to(history.device)


def prior_for_run(run: str | Path, item_ids: np.ndarray, window: int = 3, context: int = 3, decay: float = 0.3) -> TransitionPrior:
    """Count the transitions of a run's training split (``<data>/splits/<split>/train``) over the
    catalogue ``item_ids`` (sorted external ids, the Recommender's catalogue order)."""
    from cobra_scale.config import load_config
    from cobra_scale.data.io import read_table
    from cobra_scale.train.configs import TrainConfig
    from cobra_scale.train.windows import ItemIndex, list_indices

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run} is not a run folder (no config.yaml)")
    tcfg = load_config(TrainConfig, run / "config.yaml")
    train = Path(tcfg.data) / "splits" / tcfg.split / "train"
    if not train.exists():
        raise DataError(f"{train} not found: the run's training split is needed to count transitions")
    seqs = list_indices(read_table(train, columns=["user_id", "item_ids"]), "item_ids", ItemIndex(np.asarray(item_ids, np.int64)), train)
    return TransitionPrior.from_sequences(seqs, len(item_ids), window, context, decay, str(train), catalogue_key(item_ids))


def load_or_build(run: str | Path, item_ids: np.ndarray, build: bool = True) -> TransitionPrior | None:
    """``<run>/prior`` if it was counted for this catalogue; else (``build``) count and save it; else None."""
    import logging

    folder = Path(run) / "prior"
    if (folder / META).is_file():
        prior = TransitionPrior.load(folder)
        if prior.spec.catalogue_sha256 == catalogue_key(item_ids):
            return prior
        logging.getLogger(__name__).warning("%s was counted over another catalogue than the run's: %s", folder,
                                            "recounting it" if build else f"not used (recount it: `cobra prior --run {run} --overwrite`)")
    if not build:
        return None
    prior = prior_for_run(run, item_ids)
    prior.save(folder)
    return prior


def run(cfg) -> dict:
    """``cobra prior``: count a run's training transitions into ``<run>/prior``."""
    import time

    from cobra_scale.errors import ConfigError
    from cobra_scale.retrieve.build import load_items

    started = time.perf_counter()
    folder = Path(cfg.run) / "prior"
    if (folder / META).exists() and not cfg.overwrite:
        raise ConfigError(f"{folder} already holds a prior (pass --overwrite to recount it)")
    saved = load_items(cfg.index) if cfg.index else None
    if saved is not None:
        item_ids = saved[0]
    else:
        from cobra_scale.config import load_config
        from cobra_scale.train.configs import TrainConfig
        from cobra_scale.train.trainer import prepare

        if not (Path(cfg.run) / "config.yaml").is_file():
            raise DataError(f"{cfg.run} is not a run folder (no config.yaml)")
        item_ids = prepare(load_config(TrainConfig, Path(cfg.run) / "config.yaml"))[0].item_ids
    prior = prior_for_run(cfg.run, item_ids, cfg.window, cfg.context, cfg.decay)
    prior.save(folder)
    return {"items": prior.spec.items, "sequences": prior.spec.sequences, "transitions": int(prior.matrix.nnz),
            "seconds": round(time.perf_counter() - started, 1), "out": str(folder)}


def mix(cand: torch.Tensor, fused: torch.Tensor, prior_items: torch.Tensor, prior_p: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - weight) · fused + weight · prior`` over the union of two candidate lists.

    ``cand`` (B, C) items with BeamFusion scores ``fused`` (B, C) (item -1 / score -inf =
    none; an item at most once per row), ``prior_items`` (B, P) with ``prior_p`` (B, P)
    (item -1 = none). Returns ``(items (B, C + P), scores (B, C + P))``: every item once,
    -1 / -inf for padding and for prior items already in ``cand``.
    """
    big = torch.iinfo(torch.long).max
    p_sorted_items, order = prior_items.masked_fill(prior_items < 0, big).sort(dim=1)
    p_sorted = prior_p.gather(1, order)
    at = torch.searchsorted(p_sorted_items, cand.clamp(min=0)).clamp(max=p_sorted_items.shape[1] - 1)
    hit = (p_sorted_items.gather(1, at) == cand) & (cand >= 0)
    p_of_cand = torch.where(hit, p_sorted.gather(1, at), torch.zeros_like(fused))
    ok = torch.isfinite(fused) & (cand >= 0)
    cobra = torch.where(ok, (1 - weight) * fused.clamp(min=0) + weight * p_of_cand, torch.full_like(fused, float("-inf")))
    # a prior item is in the list when a scored candidate found it above (marked at its sorted position, then put
    # back in the prior's order): no sort of the candidates, which outnumber the prior's items (M x C against P)
    found = torch.zeros_like(p_sorted_items).scatter_add_(1, at, (hit & ok).long()) > 0
    in_cobra = torch.zeros_like(found).scatter_(1, order, found)
    only = (prior_items >= 0) & ~in_cobra
    prior = torch.where(only, weight * prior_p, torch.full_like(prior_p, float("-inf")))
    return torch.cat([cand.masked_fill(~ok, -1), prior_items.masked_fill(~only, -1)], 1), torch.cat([cobra, prior], 1)


__all__ = ["PriorSpec", "TransitionPrior", "catalogue_key", "history_scores", "load_or_build", "mix", "prior_for_run", "transition_matrix"]
