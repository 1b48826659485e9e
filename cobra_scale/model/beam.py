"""Coarse-to-fine inference: constrained beam search over the code levels, then BeamFusion.

Beam search is batched over users, uses the decoder's KV cache, and only follows prefixes
of IDs that exist in the catalogue (:class:`PrefixMasks`). For each of the M final beams
the ID's last code is appended and the decoder predicts a dense vector *for that ID*.

BeamFusion (paper eq. 13) scores a candidate item ``a`` of beam ``m``:

    score(a) = softmax_m(tau * beam_score)[m] * softmax_a(psi * cos(v_m, a))

``normalize="per_beam"`` (the default) takes the second softmax over the candidates of
each beam: the score is then P(ID) x P(item | ID), the factorisation the model is trained
for (on Beauty it beat ``"global"`` by about half on valid Recall@10, docs/model.md).
``"global"`` takes it over all candidates of the user (the ranking is then
``tau``-weighted beam log-probability plus ``psi * cos``, and a large ID's items are not
shared out by its size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cobra_scale.model.cobra import CobraModel

NEG = float("-inf")


class PrefixMasks:
    """Which code may follow which prefix: a trie of the catalogue's IDs.

    Shallow levels are dense tables, ``allowed[l]`` (K**l, K) bool: row = packed prefix of l
    codes, column = next code. Levels whose table would exceed ``dense_rows`` rows (deep tries,
    e.g. dedup codes on a catalogue of millions) keep the sorted packed prefixes of l + 1 codes
    that exist instead (``allowed[l]`` is then a 1-D int64 tensor) and look them up by binary
    search; the masks are the same.
    """

    def __init__(self, codes: np.ndarray, codes_per_level: int, device: torch.device | str = "cpu", dense_rows: int = 2**16):
        n, levels = codes.shape
        if codes_per_level**levels >= 2**62:
            raise ValueError(f"{levels} levels of {codes_per_level} codes overflow a packed int64 ID")
        self.levels, self.codes = levels, codes_per_level
        self.allowed = []
        prefix = np.zeros(n, dtype=np.int64)
        for level in range(levels):
            nxt = prefix * codes_per_level + codes[:, level]
            if codes_per_level**level <= dense_rows:
                table = torch.zeros(codes_per_level**level, codes_per_level, dtype=torch.bool)
                table[torch.from_numpy(prefix), torch.from_numpy(codes[:, level])] = True
            else:
                table = torch.from_numpy(np.unique(nxt))
            self.allowed.append(table.to(device))
            prefix = nxt

    def mask(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """(B,) packed prefixes of ``level`` codes -> (B, K) allowed next codes."""
        table = self.allowed[level]
        if table.dim() == 2:
            return table[prefix]
        want = prefix[:, None] * self.codes + torch.arange(self.codes, device=prefix.device)  # (B, K)
        at = torch.searchsorted(table, want).clamp(max=len(table) - 1)
        return table[at] == want


@dataclass
class Beams:
    codes: torch.Tensor  # (B, M, L) long; rows of invalid beams are 0
    scores: torch.Tensor  # (B, M) sum of code log-probs; -inf for invalid beams
    dense: torch.Tensor | None  # (B, M, d) dense vector predicted for each beam's ID
    sids: torch.Tensor  # (B, M) packed IDs
    free: torch.Tensor | None = None  # (B, d) the ID-free dense vector (before the codes), with ``free_query=True``

    def query(self, free_weight: float = 0.0) -> torch.Tensor:
        """(B, M, d) each beam's query inside its ID: the vector for that ID (the paper), or with ``free_weight`` w > 0
        ``normalize((1 - w) v(ID) + w v_free)`` (beyond the paper; needs ``free_query=True`` in :func:`beam_search`)."""
        if not 0 <= free_weight <= 1:
            raise ValueError(f"free_weight must lie in [0, 1], got {free_weight}")
        if free_weight == 0:
            return self.dense
        if self.dense is None or self.free is None:
            raise ValueError("a free_weight > 0 needs the beams' dense vectors and the ID-free one (beam_search(..., free_query=True))")
        return F.normalize((1 - free_weight) * self.dense + free_weight * self.free[:, None, :].to(self.dense.dtype), dim=-1)


@torch.no_grad()
def beam_search(
    model: CobraModel,
    codes: torch.Tensor,
    vectors: torch.Tensor | None,
    valid: torch.Tensor,
    masks: PrefixMasks,
    beams: int,
    with_dense: bool = True,
    last_items: torch.Tensor | None = None,
    free_query: bool = False,
) -> Beams:
    """M-beam search over the code levels for a batch of histories.

    Args:
        codes: (B, S, L) history codes; vectors: (B, S, d) history dense vectors;
        valid: (B, S) True for real (left-padded) history items.
        beams: M, the number of IDs returned per user.
        last_items: (B,) catalogue index of each history's most recent item (-1 = none), or (B, n) the histories
            themselves (left-padded, most recent last); needed by a model with ``successor_embedding``, whose rows of
            the last ``successor_context`` items then join every hidden state of the next item.
        free_query: also return ``Beams.free``, the model's ID-free dense prediction from the position before the
            codes (the head that ``model.history_dense_weight`` trains), for :meth:`Beams.query`.
    """
    L, K = masks.levels, masks.codes
    h, cache, pos = model.start(codes, vectors, valid)
    b = h.shape[0]
    shift = model.successor_shift(last_items)  # (B, d) or None
    if shift is not None:
        h = h + shift.to(h.dtype)
    h0 = h  # the position before the next item's codes
    hist, rec = _history(model, codes, valid)
    lp = _level_logprobs(model, h, 0, torch.zeros(b, dtype=torch.long, device=h.device), masks, hist[0] if hist else None, rec)  # (B, K)
    m0 = min(beams, K)
    scores, first = lp.topk(m0, dim=-1)  # (B, M0)
    seqs = first[:, :, None]  # (B, M, l)
    m = m0
    cache = cache.repeat_interleave(m)
    pos_beam = pos.repeat_interleave(m)
    for level in range(1, L):
        flat_codes = seqs[:, :, -1].reshape(-1)
        before = _pack(seqs[:, :, : level - 1].reshape(b * m, level - 1), K)  # codes < level-1
        hb, cache = model.step_code(cache, level - 1, flat_codes, pos_beam, before)
        prefix = before * K + flat_codes
        users = torch.arange(b, device=h.device).repeat_interleave(m)
        if shift is not None:
            hb = hb + shift[users].to(hb.dtype)
        lp = _level_logprobs(model, hb, level, prefix, masks, hist[level][users] if hist else None, rec[users] if rec is not None else None).view(b, m, K)
        total = (scores[:, :, None] + lp).view(b, m * K)  # (B, M*K)
        m_new = min(beams, m * K)
        scores, flat = total.topk(m_new, dim=-1)
        parent, code = flat // K, flat % K  # (B, M')
        seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, seqs.shape[2])), code[:, :, None]], dim=2)
        rows = (torch.arange(b, device=h.device)[:, None] * m + parent).reshape(-1)
        cache = cache.select(rows)
        pos_beam = pos_beam[rows]
        m = m_new
    dense = None
    if with_dense and model.cfg.use_dense:
        hb, _ = model.step_code(cache, L - 1, seqs[:, :, -1].reshape(-1), pos_beam, _pack(seqs[:, :, : L - 1].reshape(b * m, L - 1), K))
        dense_shift = shift  # the code heads' rows unless the dense head reads fewer items
        if shift is not None and model.dense_context != model.cfg.successor_context:
            dense_shift = model.successor_shift(last_items, dense=True)
        if dense_shift is not None:
            hb = hb + dense_shift.repeat_interleave(m, dim=0).to(hb.dtype)
        dense = model.dense_prediction(hb).view(b, m, -1)
    free = model.dense_prediction(h0) if (free_query and dense is not None) else None  # as history_dense_weight trains it
    ok = torch.isfinite(scores)
    seqs = seqs.masked_fill(~ok[:, :, None], 0)
    sids = torch.zeros_like(scores, dtype=torch.long)
    for j in range(L):
        sids = sids * K + seqs[:, :, j]
    return Beams(seqs, scores, dense, sids, free)


@torch.no_grad()
def greedy_decode(
    model: CobraModel, codes: torch.Tensor, vectors: torch.Tensor | None, valid: torch.Tensor, masks: PrefixMasks,
    last_items: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference decoding without the KV cache: argmax code per level, full recompute.

    Returns (B, L) codes. Used by the tests to hold beam search (M=1) to the spec.
    """
    shift = model.successor_shift(last_items)
    b = valid.shape[0]
    L, K = masks.levels, masks.codes
    out = torch.zeros(b, L, dtype=torch.long, device=valid.device)
    prefix = torch.zeros(b, dtype=torch.long, device=valid.device)
    h, _, pos = model.start(codes, vectors, valid)
    hist, rec = _history(model, codes, valid)
    for level in range(L):
        if level > 0:
            # re-read the whole history plus the codes chosen so far, no cache
            _, cache, _ = model.start(codes, vectors, valid)
            for j in range(level):
                h, cache = model.step_code(cache, j, out[:, j], pos, _pack(out[:, :j], K))
        if shift is not None:
            h = h + shift.to(h.dtype)
        lp = _level_logprobs(model, h, level, prefix, masks, hist[level] if hist else None, rec)
        out[:, level] = lp.argmax(-1)
        prefix = prefix * K + out[:, level]
    return out


def _history(model: CobraModel, codes: torch.Tensor, valid: torch.Tensor) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """For the model's repeat bias: per level, the users' history IDs cut at that level (B, S), and how many items
    back each history item is (B, S; None unless the bias has offsets per position); (None, None) without a repeat bias."""
    if getattr(model, "repeat", None) is None:
        return None, None
    recency = model.history_recency(valid) if model.repeat.positions > 1 else None
    return [model.history_nodes(codes, valid, level) for level in range(codes.shape[-1])], recency


def _level_logprobs(
    model: CobraModel, h: torch.Tensor, level: int, prefix: torch.Tensor, masks: PrefixMasks, history: torch.Tensor | None = None,
    recency: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) code log-probs of ``level``, codes absent from the trie after ``prefix`` at -inf.

    A model trained with ``constrained_codes`` is scored as it was trained: the softmax is taken over
    the allowed codes, so a beam's score is log P(ID) over the catalogue's IDs. Otherwise the softmax
    is over all K codes and the disallowed ones are masked afterwards.
    """
    allowed = masks.mask(level, prefix)
    if model.cfg.constrained_codes:
        return model.code_logprobs(h, level, prefix, allowed, history, recency)
    return model.code_logprobs(h, level, prefix, history=history, recency=recency).masked_fill(~allowed, NEG)


def _pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    """(N, l) codes -> (N,) packed prefix (0 for l = 0)."""
    packed = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for j in range(codes.shape[1]):
        packed = packed * k + codes[:, j]
    return packed


def beam_fusion(
    beam_scores: torch.Tensor,
    cand_cos: torch.Tensor,
    tau: float,
    psi: float,
    normalize: str = "per_beam",
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """BeamFusion scores of candidates.

    Args:
        beam_scores: (B, M) beam log-probabilities (-inf = invalid beam).
        cand_cos: (B, M, C) cosine of each beam's candidates with that beam's dense
            vector (-inf = padding / excluded).
        tau, psi: the temperatures of eq. 13.
        shift: (B, M, C) or None, added to the cosine in the numerator of the cosine softmax
            only (the model's ``dense_repeat_bias``): a candidate's probability is multiplied by
            ``exp(psi * shift)`` and the other candidates are not renormalised, i.e. the factor
            acts on the joint P(ID) x P(item | ID), as the offset does in the training's
            softmax over all items (so an ID whose only item is a history item falls too).

    Returns:
        (B, M, C) scores (in [0, 1] without a positive shift); 0 for padding.
    """
    beam_p = torch.softmax(tau * beam_scores, dim=-1).nan_to_num(0.0)  # (B, M)
    logits = psi * cand_cos
    if normalize == "per_beam":
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    elif normalize == "global":
        b, m, c = logits.shape
        log_norm = torch.logsumexp(logits.view(b, m * c), dim=-1).view(b, 1, 1)
    else:
        raise ValueError(f"normalize must be 'global' or 'per_beam', got {normalize!r}")
    numerator = logits if shift is None else logits + psi * shift.to(logits.dtype)
    cand_p = torch.exp(numerator - log_norm)
    return (beam_p[:, :, None] * cand_p.nan_to_num(0.0)).nan_to_num(0.0)
