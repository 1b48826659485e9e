"""CobraModel: the cascaded sparse-dense decoder over ``[e1, v1, e2, v2, ...]``.

Each history item contributes L code tokens (its sparse ID, one embedding table per
level) followed by one dense token (its text encoder vector), each with an item-position
and a token-type embedding. For item j the decoder predicts, from the tokens

    [v_{j-1}, c^0_j, ..., c^{L-1}_j]
        -> code 0 of j, code 1 of j, ..., code L-1 of j, dense vector of j

so code l is predicted with codes < l of the same item in context, and the dense vector
*given the full ID*. Ablations: ``use_sparse=False`` keeps only dense tokens (w/o ID);
``use_dense=False`` keeps only code tokens (w/o Dense, TIGER-like).

Shapes: B users, S items per sequence (left padded, -1), L levels, U unique items in the
batch, Tt text tokens, d = d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cobra_scale.errors import ConfigError
from cobra_scale.model.config import CobraConfig
from cobra_scale.model.decoder import CausalDecoder, KVCache
from cobra_scale.model.text_encoder import ItemTextEncoder


@dataclass
class Batch:
    """One training batch; every tensor on the model's device."""

    item_tokens: torch.Tensor  # (U, Tt) long, [CLS] first, 0 = pad
    item_token_mask: torch.Tensor  # (U, Tt) long/bool
    item_codes: torch.Tensor  # (U, L) long
    item_ids: torch.Tensor  # (U,) long, catalogue index of each unique item
    seq: torch.Tensor  # (B, S) long, index into the U unique items, -1 = left padding


@dataclass
class Losses:
    total: torch.Tensor
    sparse: torch.Tensor
    dense: torch.Tensor
    sparse_per_level: list[float]
    predictions: int
    item_vectors: torch.Tensor | None = None  # (U, d) the batch's encoded items, detached (for a negatives bank)
    item_text: torch.Tensor | None = None  # (U, d) the same without the per-item rows, detached (a catalogue_live_rows bank)


def dense_contrastive_loss(
    pred, keys, positives, temperature, query_item_ids, key_item_ids, impl: str = "auto", scope: str = "local", reduction: str = "mean"
):
    """The dense loss: in-batch softmax over cosine similarity (one routed function).

    ``pred`` (P, d), ``keys`` (U, d), ``positives`` (P,) -> mean loss (``reduction="none"``: the (P,) per-row losses). Routed through the
    kernel dispatcher of ``cobra_kernels`` (reference / tiled / Triton). ``scope="global"``
    scores the queries against the keys of every data-parallel rank (``torch.distributed``
    all-gather, gradients back to their owners), so that W ranks of batch B/W train the
    in-batch softmax of one batch B; without a process group it is the local loss.
    """
    if scope == "global":
        from cobra_kernels.distributed import global_cosine_contrastive_loss

        return global_cosine_contrastive_loss(pred, keys, positives, temperature, query_item_ids, key_item_ids, impl=impl, reduction=reduction)
    from cobra_kernels import cosine_contrastive_loss

    return cosine_contrastive_loss(pred, keys, positives, temperature, query_item_ids, key_item_ids, impl=impl, reduction=reduction)


def code_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, plain CE)`` of one code level: the mean cross-entropy of ``target`` (P,) under ``logits`` (P, K), with
    label smoothing ``smoothing`` spread over the codes whose logit is finite (-inf marks codes the trie rules out, which
    torch's own ``label_smoothing`` would count and turn into an infinite loss)."""
    if smoothing == 0.0:
        ce = F.cross_entropy(logits, target)
        return ce, ce
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    allowed = torch.isfinite(logp)
    uniform = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1).clamp(min=1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean(), nll.mean()


class Temperature(nn.Module):
    """The dense softmax temperature, learned in log space (a module, so that ZeRO-3 gathers it
    around its own forward and backward like any other parameter)."""

    def __init__(self, value: float, learn: bool):
        super().__init__()
        # (1,), not 0-d: DeepSpeed broadcasts parameters as byte views, which a 0-d tensor cannot give
        self.log_temperature = nn.Parameter(torch.tensor([math.log(value)]), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=1e-3)[0]


class RepeatBias(nn.Module):
    """``repeat_bias``: learned logit offsets per code level (zero-initialised; a module, as :class:`Temperature`).

    One per level (``positions=1``, shape (L,)), or one per level and recency bucket (shape (L, positions)):
    bucket r < positions - 1 is the r-th most recent history item, the last bucket every older one.
    """

    def __init__(self, levels: int, positions: int = 1):
        super().__init__()
        self.positions = positions
        self.logit = nn.Parameter(torch.zeros(levels) if positions == 1 else torch.zeros(levels, positions))

    def forward(self, level: int) -> torch.Tensor:
        """(positions,) offsets of ``level``."""
        return self.logit[level].reshape(-1)


def nearest_bucket(match: torch.Tensor, recency: torch.Tensor, positions: int) -> torch.Tensor:
    """Recency bucket of the most recent matching history item: ``match`` (R, X, S) bool, ``recency`` (R, S) items back
    -> (R, X) in ``0..positions-1`` (the last bucket for every older item; where nothing matches, the last too)."""
    far = torch.iinfo(torch.long).max
    return torch.where(match, recency[:, None, :], far).amin(-1).clamp(max=positions - 1)


class CobraModel(nn.Module):
    def __init__(self, cfg: CobraConfig):
        super().__init__()
        self.cfg = cfg
        d, L = cfg.d_model, cfg.levels
        self.tokens_per_item = (L if cfg.use_sparse else 0) + (1 if cfg.use_dense else 0)
        self.encoder = ItemTextEncoder(cfg.vocab_size, cfg.encoder_dim, cfg.encoder_layers, cfg.encoder_heads, cfg.text_tokens, d, cfg.dropout, cfg.attention_dropout,
                                      cfg.text_pooling)
        self.code_emb = nn.ModuleList(nn.Embedding(cfg.codes, d) for _ in range(L))
        # One row per node of the ID trie (code + its prefix), shared by the input tokens and
        # the code heads (tied, as SASRec ties its item table): the shared per-level table
        # alone cannot tell code 5 under prefix (3,) from code 5 under (7,). Zero-initialised,
        # so an ID never seen in training (cold start) falls back to the per-level tables.
        self.prefix_emb = (
            nn.ModuleList(nn.Embedding(min(cfg.codes ** (level + 1), cfg.prefix_rows), d) for level in range(L))
            if cfg.prefix_embeddings and cfg.use_sparse
            else None
        )
        if self.prefix_emb is not None:
            for table in self.prefix_emb:
                nn.init.zeros_(table.weight)
        # Free per-item rows added to the text vector (item_embedding; zero-initialised, so an
        # item starts as its text and a held-out / new item stays its text).
        if cfg.item_embedding and cfg.catalogue_items <= 0:
            raise ConfigError("item_embedding needs catalogue_items > 0 (the trainer sets it from the catalogue)")
        self.item_emb = nn.Embedding(cfg.catalogue_items, d) if cfg.item_embedding else None
        if self.item_emb is not None:
            nn.init.zeros_(self.item_emb.weight)
        # successor_embedding: a free per-item row of the last history item, added to the hidden states that
        # predict the next item (zero-initialised: the model starts as without it)
        if cfg.successor_embedding and cfg.catalogue_items <= 0:
            raise ConfigError("successor_embedding needs catalogue_items > 0 (the trainer sets it from the catalogue)")
        self.succ_emb = nn.Embedding(cfg.catalogue_items, d) if cfg.successor_embedding else None
        if self.succ_emb is not None:
            nn.init.zeros_(self.succ_emb.weight)
        # successor_context > 1: a learned weight per recency (most recent first) on the rows of the last few items
        self.succ_mix = (
            nn.Parameter(0.3 ** torch.arange(cfg.successor_context, dtype=torch.float32))
            if cfg.successor_embedding and cfg.successor_context > 1
            else None
        )
        # repeat_bias: one learned logit offset per level for codes that extend the prefix of a history item's ID
        self.repeat = RepeatBias(L, cfg.repeat_positions) if cfg.repeat_bias and cfg.use_sparse else None
        # dense_repeat_bias: a learned logit offset in the dense softmax for keys that are the user's own history items
        self.dense_repeat = RepeatBias(1, cfg.dense_repeat_positions) if cfg.dense_repeat_bias and cfg.use_dense else None
        self.type_emb = nn.Embedding(L + 1, d)  # levels 0..L-1, then "dense"
        self.pos_emb = nn.Embedding(cfg.max_items, d)
        self.dense_in = nn.Linear(d, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.decoder = CausalDecoder(d, cfg.decoder_layers, cfg.decoder_heads, cfg.dropout, cfg.attention_dropout)
        self.code_heads = nn.ModuleList(nn.Linear(d, cfg.codes) for _ in range(L))
        self.dense_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.temp = Temperature(cfg.temperature, cfg.learn_temperature)
        self.dense_loss_impl = "auto"
        self.dense_loss_scope = "local"  # "global": in-batch negatives from every data-parallel rank (set by the trainer)
        # the catalogue's ID trie (a model.beam.PrefixMasks), needed by the sparse loss when cfg.constrained_codes
        # (set by the trainer; not a parameter, not saved: inference builds its own from its catalogue)
        self.code_masks = None

    # ------------------------------------------------------------------ building blocks

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp()

    def type_embedding(self, kind: int) -> torch.Tensor:
        """(d,) token-type embedding: code level ``kind`` < L, or L for the dense token.

        Called as a module (not read as ``.weight``) so that ZeRO-3 gathers the table."""
        return self.type_emb(torch.tensor(kind, device=self.pos_emb.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "log_temperature"  # weights saved before the temperature became a module
        if old in state_dict:
            state_dict[prefix + "temp.log_temperature"] = state_dict.pop(old).reshape(1)
        if prefix + "repeat_logit" in state_dict:  # a development name of repeat.logit
            state_dict[prefix + "repeat.logit"] = state_dict.pop(prefix + "repeat_logit")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prefix_rows(self, level: int, packed: torch.Tensor) -> torch.Tensor:
        """Rows of ``prefix_emb[level]`` for IDs packed over codes 0..level (any shape)."""
        rows = self.prefix_emb[level].num_embeddings
        if self.cfg.codes ** (level + 1) <= rows:
            return packed
        return torch.remainder(packed * 2654435761, rows)  # multiplicative hash of deep tries

    def history_nodes(self, codes: torch.Tensor, valid: torch.Tensor, level: int) -> torch.Tensor:
        """History IDs cut at ``level``: ``codes`` (..., S, L), ``valid`` (..., S) -> (..., S) codes 0..level
        packed into one int64, -1 where the item is padding (the ``history`` of :meth:`code_logits`)."""
        packed = torch.zeros_like(codes[..., 0])
        for j in range(level + 1):
            packed = packed * self.cfg.codes + codes[..., j].clamp(min=0)
        return packed.masked_fill(~valid, -1)

    @staticmethod
    def history_recency(valid: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, S) how many items back each history item is (0 = the last, the most recent; left padding)."""
        s = valid.shape[-1]
        return (s - 1 - torch.arange(s, device=valid.device)).expand_as(valid)

    def code_logits(
        self, h: torch.Tensor, level: int, prefix: torch.Tensor | None = None, history: torch.Tensor | None = None, recency: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(P, d) hidden states -> (P, K) logits of the code of ``level``.

        ``prefix`` (P,) packs the codes of levels < ``level`` (needed with prefix embeddings).
        ``history`` (P, S), the :meth:`history_nodes` of each row's history items at ``level``
        (-1 = none), adds the learned ``repeat_bias`` to the codes that extend the prefix into
        one of them (ignored when the model has no repeat bias). With ``repeat_positions`` > 1,
        ``recency`` (P, S) (:meth:`history_recency`) picks the offset of the most recent such item.
        """
        logits = self.code_heads[level](h)
        if self.repeat is not None and history is not None:
            k = self.cfg.codes
            base = prefix if prefix is not None else torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            want = base[:, None] * k + torch.arange(k, device=h.device)  # (P, K) the node each code would make
            match = want[:, :, None] == history[:, None, :]  # (P, K, S)
            seen = match.any(-1)  # (P, K)
            offsets = self.repeat(level).to(logits.dtype)  # (positions,)
            if self.repeat.positions == 1:
                logits = logits + offsets[0] * seen.to(logits.dtype)
            else:
                if recency is None:
                    raise ValueError("model.repeat_positions > 1 needs the history's recency (CobraModel.history_recency)")
                bucket = nearest_bucket(match, recency, self.repeat.positions)  # (P, K)
                logits = logits + offsets[bucket] * seen.to(logits.dtype)
        if self.prefix_emb is not None:
            k = self.cfg.codes
            base = prefix if prefix is not None else torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            nodes = self.prefix_rows(level, base[:, None] * k + torch.arange(k, device=h.device))  # (P, K)
            logits = logits + torch.einsum("pd,pkd->pk", h, self.prefix_emb[level](nodes).to(h.dtype))
        return logits

    def history_item_offsets(self, candidates: torch.Tensor, history: torch.Tensor) -> torch.Tensor | None:
        """Inference's ``dense_repeat_bias``: what to add to the cosine of each candidate item, or None without the bias.

        ``candidates`` (B, ...) catalogue indices (any value < 0 = padding), ``history`` (B, S) the users' items,
        left-padded with -1 (the last column is the most recent). A candidate that is a history item gets
        ``temperature x offset`` of its most recent occurrence's recency bucket, as the training logit
        ``cos / T + offset = (cos + T * offset) / T``; other candidates get 0.
        """
        if self.dense_repeat is None:
            return None
        b, s = history.shape
        flat = candidates.reshape(b, -1)
        match = (flat[:, :, None] == history[:, None, :]) & (history[:, None, :] >= 0) & (flat[:, :, None] >= 0)  # (B, X, S)
        bucket = nearest_bucket(match, self.history_recency(history >= 0), self.dense_repeat.positions)  # (B, X)
        shift = self.dense_repeat(0).detach().float()[bucket] * match.any(-1)
        return (self.temperature.detach().float() * shift).view(candidates.shape)

    def _dense_repeat_rows(
        self, ce: torch.Tensor, pred: torch.Tensor, keys_hist: torch.Tensor, key_pos: torch.Tensor, keep: torch.Tensor,
        bucket: torch.Tensor, is_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Per-row dense loss with ``dense_repeat_bias``, from the kernel's per-row loss ``ce`` (P,) of the unbiased logits.

        With ``z_pk = cos(pred_p, key_k) / T``, history keys ``u`` of row p (``keys_hist`` (P, S, d) where ``keep``)
        get ``z + b_u``. Then, exactly, ``logsumexp'_p = CE_p + z_p,pos + log(1 + sum_u (e^b_u - 1) exp(z_pu - z_p,pos - CE_p))``
        and ``CE'_p = logsumexp'_p - z_p,pos - b_pos [pos in history]``: S + 1 direct dot products per row, no (P, N) bias
        through the kernels. ``exp(z_pu - z_p,pos - CE_p)`` is u's softmax probability, so nothing overflows.
        """
        t = self.temperature.float()
        q = F.normalize(pred.float(), dim=-1)
        z_hist = (q[:, None, :] * F.normalize(keys_hist.float(), dim=-1)).sum(-1) / t  # (P, S)
        z_pos = (q * F.normalize(key_pos.float(), dim=-1)).sum(-1) / t  # (P,)
        b = self.dense_repeat(0).float()[bucket]  # (P, S)
        ce = ce.float()
        prob = torch.exp((z_hist - (z_pos + ce)[:, None]).clamp(max=0.0))
        extra = ((torch.exp(b) - 1.0) * prob).masked_fill(~keep, 0.0).sum(-1)
        return ce + torch.log((1.0 + extra).clamp(min=1e-12)) - (b * (keep & is_pos)).sum(-1)

    def encode_items(self, tokens: torch.Tensor, mask: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Dense vectors (U, d) of items from their text tokens (U, Tt).

        ``items`` (U,) are their catalogue indices; with ``item_embedding`` on, items that
        have a row (index < catalogue_items) get it added. Without ``items`` (or for indices
        beyond the table, e.g. items added after training) the vector is the text's alone.
        """
        return self.with_item_rows(self.encoder(tokens, mask), items)

    def with_item_rows(self, vectors: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        """Text vectors ``vectors`` (U, d) of catalogue ``items`` (U,) plus their per-item rows (``item_embedding``;
        nothing for indices beyond the table, for ``items=None`` or without the rows). The rows keep their gradient:
        ``catalogue_live_rows`` builds the catalogue term's keys from stale text vectors with it."""
        if self.item_emb is None or items is None:
            return vectors
        known = (items >= 0) & (items < self.item_emb.num_embeddings)
        rows = self.item_emb(items.clamp(0, self.item_emb.num_embeddings - 1))
        return vectors + rows * known[:, None].to(rows.dtype)

    def successor_shift(self, last_items: torch.Tensor | None, dense: bool = False) -> torch.Tensor | None:
        """``successor_embedding``: each row's most recent history items -> (B, d), the row to add to every hidden state
        that predicts the row's next item (``dense``: to the one that predicts its dense vector); None for a model
        without it.

        ``last_items`` is (B,), the catalogue index of each row's last history item, or (B, n), its history (left-padded,
        most recent last), of which the last ``successor_context`` columns (``successor_context_dense`` for ``dense``,
        when set) are read and their rows weighted by recency. -1 and items beyond the table (e.g. ones added after
        training) add nothing."""
        if self.succ_emb is None:
            return None
        if last_items is None:
            raise ValueError("model.successor_embedding needs each history's last item (last_items)")
        k = self.dense_context if dense else self.cfg.successor_context
        items = last_items[:, None] if last_items.dim() == 1 else last_items
        if items.shape[1] < k:
            items = F.pad(items, (k - items.shape[1], 0), value=-1)
        items = items[:, -k:].flip(1)  # (B, k), most recent first
        n = self.succ_emb.num_embeddings
        known = (items >= 0) & (items < n)
        rows = self.succ_emb(items.clamp(0, n - 1)) * known[..., None].to(self.succ_emb.weight.dtype)  # (B, k, d)
        if self.succ_mix is None:
            return rows[:, 0]
        return (rows * self.succ_mix[None, :k, None].to(rows.dtype)).sum(1)

    @property
    def dense_context(self) -> int:
        """How many of the last history items' successor rows the dense head reads (``successor_context_dense``; a model
        without a dense head: ``successor_context``, so that every head it has reads the same rows)."""
        return (self.cfg.use_dense and self.cfg.successor_context_dense) or self.cfg.successor_context

    def with_successor(self, h: torch.Tensor, last_items: torch.Tensor | None, dense: bool = False) -> torch.Tensor:
        """Hidden states ``h`` (B, d) that predict each row's next item (``dense``: its dense vector), plus
        :meth:`successor_shift` of its last items (``h`` itself for a model without ``successor_embedding``)."""
        shift = self.successor_shift(last_items, dense)
        return h if shift is None else h + shift.to(h.dtype)

    @torch.no_grad()
    def init_item_embedding(self, rows: torch.Tensor) -> None:
        """Start the per-item rows (``item_embedding``) from ``rows`` (catalogue_items, d) instead of zeros."""
        if self.item_emb is None:
            raise ConfigError("init_item_embedding needs item_embedding on")
        if tuple(rows.shape) != tuple(self.item_emb.weight.shape):
            raise ConfigError(f"item rows have shape {tuple(rows.shape)}, expected {tuple(self.item_emb.weight.shape)}")
        self.item_emb.weight.copy_(rows.to(self.item_emb.weight))

    def init_prefix_embedding(self, level: int, rows: torch.Tensor) -> None:
        """Overwrite ``prefix_emb[level]`` (one row per node of the ID trie at ``level``) with ``rows``."""
        if self.prefix_emb is None:
            raise ConfigError("init_prefix_embedding needs model.prefix_embeddings on (and the sparse path)")
        if not 0 <= level < len(self.prefix_emb):
            raise ConfigError(f"level {level} is not one of the model's {len(self.prefix_emb)} code levels")
        table = self.prefix_emb[level].weight
        if tuple(rows.shape) != tuple(table.shape):
            raise ConfigError(f"prefix rows of level {level} have shape {tuple(rows.shape)}, expected {tuple(table.shape)}")
        with torch.no_grad():
            table.copy_(rows.to(table))

    def item_tokens(self, codes: torch.Tensor, vectors: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Input embeddings of items: ``codes`` (B, S, L), ``vectors`` (B, S, d), ``positions`` (B, S)
        -> (B, S, tokens_per_item, d) in the order [c^0 .. c^{L-1}, v]."""
        parts = []
        pos = self.pos_emb(positions.clamp(0, self.cfg.max_items - 1))  # (B, S, d)
        if self.cfg.use_sparse:
            codes = codes.clamp(min=0)
            packed = torch.zeros_like(codes[..., 0])
            for level in range(self.cfg.levels):
                packed = packed * self.cfg.codes + codes[..., level]
                emb = self.code_emb[level](codes[..., level]) + self.type_embedding(level) + pos
                if self.prefix_emb is not None:
                    emb = emb + self.prefix_emb[level](self.prefix_rows(level, packed))
                parts.append(emb)
        if self.cfg.use_dense:
            assert vectors is not None
            parts.append(self.dense_in(vectors) + self.type_embedding(self.cfg.levels) + pos)
        return torch.stack(parts, dim=2)

    @staticmethod
    def positions(valid: torch.Tensor) -> torch.Tensor:
        """Item positions (B, S) counted from each row's first real item (left padding)."""
        return (valid.long().cumsum(1) - 1).clamp(min=0)

    # ------------------------------------------------------------------ training

    def forward(
        self, batch: Batch, bank_keys: torch.Tensor | None = None, bank_ids: torch.Tensor | None = None,
        id_bank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Losses:
        """Losses of a batch.

        ``id_bank`` = ``(vectors (N, d), candidates (U, W))``: the latest vectors of all N
        catalogue items (no gradient) and, per unique item of the batch, catalogue indices
        whose column 0 is the item itself and the rest other items of its sparse ID (-1
        padded; :func:`~cobra_scale.train.negatives.same_id_candidates`). It adds a dense term:
        each prediction against its target's row of candidates, the target's bank vector as the
        positive -- the softmax P(item | ID) inside the target's ID that inference ranks with.

        ``bank_keys`` (E, d), the latest vectors of catalogue items (no gradient), with their
        catalogue indices ``bank_ids`` (E,, sorted, holding every target of the batch), add a
        second dense term: each prediction against the bank's keys alone, the target's own
        bank vector as the positive. Positives and negatives are then equally stale; mixing
        the batch's fresh vectors among stale negatives would let the model tell them apart
        by age instead of by item (measured: the dense loss then learns nothing).
        """
        cfg = self.cfg
        L, T = cfg.levels, self.tokens_per_item
        seq = batch.seq
        valid = seq >= 0  # (B, S)
        idx = seq.clamp(min=0)
        text = self.encoder(batch.item_tokens, batch.item_token_mask) if cfg.use_dense else None  # (U, d)
        vectors = self.with_item_rows(text, batch.item_ids) if cfg.use_dense else None  # (U, d)
        codes = batch.item_codes[idx]  # (B, S, L)
        x = self.item_tokens(codes, vectors[idx] if vectors is not None else None, self.positions(valid))  # (B, S, T, d)
        b, s = seq.shape
        x = self.emb_drop(x.reshape(b, s * T, -1))
        key_mask = valid[:, :, None].expand(b, s, T).reshape(b, s * T)
        h, _ = self.decoder(x, key_mask)  # (B, S*T, d)
        h = h.view(b, s, T, -1)
        # inputs predicting item j: the last token of item j-1, then all but the last of item j
        pred_in = torch.cat([h[:, :-1, T - 1 : T], h[:, 1:, : T - 1]], dim=2)  # (B, S-1, T, d)
        target_ok = valid[:, 1:] & valid[:, :-1]  # (B, S-1)
        pred_in = pred_in[target_ok]  # (P, T, d)
        target_items = idx[:, 1:][target_ok]  # (P,) unique-index of the target
        if self.succ_emb is not None:  # the rows of the successor_context items just before each target
            k = cfg.successor_context
            ids = torch.where(valid, batch.item_ids[idx], -1)  # (B, S) catalogue index, -1 = padding
            # for the target at position t: the items at t-k .. t-1 (oldest first), -1 before the row's start
            before = torch.stack([F.pad(ids, (j, 0), value=-1)[:, 1:s] for j in range(k, 0, -1)], -1)
            shift = self.emb_drop(self.successor_shift(before[target_ok]))[:, None, :]  # (P, 1, d)
            if self.dense_context != k:  # the dense head (the last of the T inputs) reads fewer items
                dense_shift = self.emb_drop(self.successor_shift(before[target_ok], dense=True))[:, None, :]
                shift = torch.cat([shift.expand(-1, T - 1, -1), dense_shift], dim=1)  # (P, T, d)
            pred_in = pred_in + shift.to(pred_in.dtype)
        zero = h.new_zeros(())
        sparse, per_level = zero, []
        if cfg.use_sparse:
            target_codes = batch.item_codes[target_items]  # (P, L)
            prefix = torch.zeros_like(target_codes[:, 0])
            if cfg.constrained_codes and self.code_masks is None:
                raise ValueError("model.constrained_codes needs the catalogue's ID trie: set model.code_masks (a PrefixMasks) first")
            earlier = recency = None
            if self.repeat is not None:  # (B, S-1, S): for the target at t, items 0..t-1 of the same row
                s_ar = torch.arange(s, device=seq.device)
                earlier = (s_ar[None, :] < s_ar[1:, None])[None] & valid[:, None, :]
                if self.repeat.positions > 1:  # item j is t-1-j items back from the target at t
                    recency = (s_ar[:-1, None] - s_ar[None, :]).expand(b, s - 1, s)[target_ok]  # (P, S)
            for level in range(L):
                hist = None
                if earlier is not None:
                    nodes = self.history_nodes(codes, valid, level)  # (B, S)
                    hist = nodes[:, None, :].expand(b, s - 1, s).masked_fill(~earlier, -1)[target_ok]  # (P, S)
                logits = self.code_logits(pred_in[:, level], level, prefix, hist, recency)
                if cfg.constrained_codes:
                    logits = logits.masked_fill(~self.code_masks.mask(level, prefix), float("-inf"))
                ce, nll = code_cross_entropy(logits, target_codes[:, level], cfg.label_smoothing)
                prefix = prefix * cfg.codes + target_codes[:, level]
                sparse = sparse + ce
                per_level.append(float(nll.detach()))  # the plain CE, comparable across smoothing settings
        dense = zero
        if cfg.use_dense:
            pred = self.dense_head(pred_in[:, T - 1])  # (P, d)
            rep = self._dense_repeat_history(idx, valid, target_ok) if self.dense_repeat is not None else None
            reduction = "none" if rep is not None else "mean"
            dense = dense_contrastive_loss(
                pred, vectors, target_items, self.temperature, batch.item_ids[target_items], batch.item_ids,
                impl=self.dense_loss_impl, scope=self.dense_loss_scope, reduction=reduction,
            )
            if rep is not None:
                hist, keep, bucket = rep
                is_pos = hist == target_items[:, None]
                dense = self._dense_repeat_rows(dense, pred, vectors[hist], vectors[target_items], keep, bucket, is_pos).mean()
            if bank_keys is not None:
                targets = batch.item_ids[target_items]
                at = torch.searchsorted(bank_ids, targets).clamp(max=len(bank_ids) - 1)
                if not bool((bank_ids[at] == targets).all()):
                    raise ValueError("bank_ids must hold every target item of the batch")
                bank = dense_contrastive_loss(pred, bank_keys.to(pred.dtype), at, self.temperature, None, None, impl=self.dense_loss_impl, reduction=reduction)
                if rep is not None:  # the same offsets on the bank's copies of the history items (where the bank has them)
                    hist_ids = batch.item_ids[hist]
                    at_hist = torch.searchsorted(bank_ids, hist_ids).clamp(max=len(bank_ids) - 1)
                    in_bank = keep & (bank_ids[at_hist] == hist_ids)
                    bank = self._dense_repeat_rows(bank, pred, bank_keys[at_hist], bank_keys[at], in_bank, bucket, at_hist == at[:, None]).mean()
                dense = dense + bank
            if id_bank is not None:
                dense = dense + self._id_bank_loss(pred, *id_bank, target_items)
        total = cfg.sparse_weight * sparse + cfg.dense_weight * dense
        if cfg.history_dense_weight > 0:  # the same head from the position before the target's codes (no ID given)
            before_id = self.dense_head(pred_in[:, 0])
            total = total + cfg.history_dense_weight * dense_contrastive_loss(
                before_id, vectors, target_items, self.temperature, batch.item_ids[target_items], batch.item_ids,
                impl=self.dense_loss_impl, scope=self.dense_loss_scope,
            )
        detached = (vectors.detach(), text.detach()) if vectors is not None else (None, None)
        return Losses(total, sparse, dense, per_level, int(target_items.numel()), *detached)

    def _id_bank_loss(self, pred: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        """Mean CE of each prediction (P, d) over its target's candidates (column 0 the positive).

        Rows whose ID holds no other item are left out of the mean (their softmax has one key).
        """
        cand = candidates[target_items]  # (P, W)
        keys = F.normalize(bank.detach()[cand.clamp(min=0)].to(pred.dtype), dim=-1)  # (P, W, d), no gradient
        logits = torch.einsum("pd,pwd->pw", F.normalize(pred, dim=-1), keys).float() / self.temperature.float()
        logits = logits.masked_fill(cand < 0, float("-inf"))
        rows = (cand[:, 1:] >= 0).any(1)
        if not bool(rows.any()):
            return pred.new_zeros(()).float()
        return -F.log_softmax(logits[rows], dim=-1)[:, 0].mean()

    def _dense_repeat_history(self, idx: torch.Tensor, valid: torch.Tensor, target_ok: torch.Tensor):
        """For each prediction (the targets of ``target_ok`` (B, S-1)): its row's distinct earlier items.

        Returns ``(hist, keep, bucket)``, each (P, S): the unique-item index of history position j (0 where not
        kept), whether j is kept (valid, before the target, and the most recent occurrence of its item there), and
        the recency bucket of j (``t - 1 - j`` items back, capped at ``dense_repeat_positions - 1``).
        """
        b, s = idx.shape
        ar = torch.arange(s, device=idx.device)
        t = ar[1:]  # target positions
        earlier = (ar[None, :] < t[:, None])[None] & valid[:, None, :]  # (B, S-1, S)
        same = (idx[:, :, None] == idx[:, None, :]) & valid[:, None, :]  # (B, S, S): [j, j'] same item, j' valid
        between = (ar[None, :, None] < ar[None, None, :]) & (ar[None, None, :] < t[:, None, None])  # (S-1, S, S): j < j' < t
        superseded = (same[:, None] & between[None]).any(-1)  # (B, S-1, S)
        keep = (earlier & ~superseded)[target_ok]  # (P, S)
        hist = idx[:, None, :].expand(b, s - 1, s)[target_ok].masked_fill(~keep, 0)
        recency = (t[:, None] - 1 - ar[None, :]).clamp(min=0).expand(b, s - 1, s)[target_ok]
        return hist, keep, recency.clamp(max=self.dense_repeat.positions - 1)

    # ------------------------------------------------------------------ inference steps

    def start(self, codes: torch.Tensor, vectors: torch.Tensor | None, valid: torch.Tensor) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Read the histories: ``codes`` (B, S, L), ``vectors`` (B, S, d), ``valid`` (B, S).

        Returns ``(h_last (B, d), cache, next_position (B,))``: the hidden state of the last
        history token (it predicts code 0 of the next item, or its dense vector w/o ID).
        """
        b, s = valid.shape
        x = self.item_tokens(codes, vectors, self.positions(valid)).reshape(b, s * self.tokens_per_item, -1)
        key_mask = valid[:, :, None].expand(b, s, self.tokens_per_item).reshape(b, -1)
        h, cache = self.decoder(x, key_mask)
        return h[:, -1], cache, valid.long().sum(1)

    def step_code(
        self, cache: KVCache, level: int, code: torch.Tensor, position: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Append the code token ``code`` (B,) of ``level`` at item ``position`` (B,) -> (h (B, d), cache).

        ``prefix`` (B,) packs the codes of levels < ``level`` of the same item.
        """
        x = self.code_emb[level](code) + self.type_embedding(level) + self.pos_emb(position.clamp(max=self.cfg.max_items - 1))
        if self.prefix_emb is not None:
            packed = (prefix if prefix is not None else torch.zeros_like(code)) * self.cfg.codes + code
            x = x + self.prefix_emb[level](self.prefix_rows(level, packed))
        h, cache = self.decoder(x[:, None], torch.ones_like(code, dtype=torch.bool)[:, None], cache)
        return h[:, 0], cache

    def code_logprobs(
        self, h: torch.Tensor, level: int, prefix: torch.Tensor | None = None, allowed: torch.Tensor | None = None, history: torch.Tensor | None = None,
        recency: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, d) -> (B, K) log-probabilities of the code of ``level`` given the ``prefix`` (B,) of codes < level.

        With ``allowed`` (B, K) bool, the softmax is over the allowed codes only (disallowed ones get -inf;
        a row with none allowed is all -inf). ``history`` and ``recency`` as in :meth:`code_logits`.
        """
        logits = self.code_logits(h, level, prefix, history, recency).float()
        if allowed is None:
            return F.log_softmax(logits, dim=-1)
        # masking afterwards too turns the NaN of a row with no allowed code into -inf
        return F.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, float("-inf"))

    def dense_prediction(self, h: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, d) L2-normalised predicted dense vector."""
        return F.normalize(self.dense_head(h), dim=-1)
