"""Item text encoder: a small Transformer over the item's tokens, [CLS] first; its [CLS]
output (``pooling="cls"``, the paper), or the mean of its outputs over the real tokens
(``pooling="mean"``), projected, is the item's dense vector. Trained end to end with the
decoder.

Trained from scratch, the [CLS] output starts collapsed: at initialisation the text
hardly reaches position 0 (attention's value/output weights are ~0.02), so every item
gets the same vector (mean pairwise cosine 1.000 over 2,000 Beauty items) and the dense
softmax has nothing to separate. Mean pooling starts from the (MiniLM-initialised) token
embeddings instead. See docs/model.md.

Built on ``transformers.BertModel`` (1 layer by default), so the trained encoder is saved
with ``save_pretrained`` and loads in any tool that reads Hugging Face folders.
"""

from __future__ import annotations

import torch
from torch import nn


class ItemTextEncoder(nn.Module):
    """Token ids (U, T) with [CLS] at position 0 -> dense vectors (U, d_model)."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_tokens: int, out_dim: int, dropout: float, attention_dropout: float = 0.0,
                 pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError("pooling must be cls or mean")
        self.pooling = pooling
        from transformers import BertConfig, BertModel

        self.bert_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * dim,
            max_position_embeddings=max_tokens,
            type_vocab_size=1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
        )
        self.bert = BertModel(self.bert_config, add_pooling_layer=False)
        self.proj = nn.Linear(dim, out_dim)

    @torch.no_grad()
    def init_word_embeddings(self, matrix: torch.Tensor) -> None:
        """Initialise token embeddings from a pretrained matrix (vocab, D), PCA-projected to ``dim``.

        The projection keeps the ``dim`` directions of largest variance, scaled so the
        embeddings have the usual std (~0.02-0.05) of a freshly initialised table.
        """
        vocab, dim = self.bert.embeddings.word_embeddings.weight.shape
        if matrix.shape[0] != vocab:
            raise ValueError(f"pretrained embeddings have {matrix.shape[0]} rows, the tokenizer {vocab}")
        m = matrix.float() - matrix.float().mean(0)
        if matrix.shape[1] == dim:
            proj = m
        else:
            _, _, v = torch.linalg.svd(m[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:8192]], full_matrices=False)
            proj = m @ v[:dim].T  # (vocab, dim)
        proj = proj / proj.std() * 0.05
        self.bert.embeddings.word_embeddings.weight.copy_(proj)

    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor, length_groups: int = 4) -> torch.Tensor:
        """``token_ids``, ``attention_mask``: (U, T) -> (U, out_dim).

        Large batches are encoded in ``length_groups`` groups of similar text length, each
        cut to its own longest text, so short titles do not pay for the longest one's
        padding (same result: padding is masked out of attention).
        """
        if length_groups <= 1 or token_ids.shape[0] < 256 * length_groups:
            return self._encode(token_ids, attention_mask)
        lengths = attention_mask.sum(1)
        order = lengths.argsort()
        parts = []
        for rows in order.tensor_split(length_groups):
            used = max(1, int(lengths[rows].max()))
            parts.append(self._encode(token_ids[rows, :used], attention_mask[rows, :used]))
        out = torch.cat(parts)
        return out[order.argsort()]

    def _encode(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=token_ids, attention_mask=attention_mask).last_hidden_state  # (U, T, dim)
        if self.pooling == "cls":
            return self.proj(hidden[:, 0])
        mask = attention_mask.to(hidden.dtype)[..., None]  # mean over the real tokens, [CLS] included
        return self.proj((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
