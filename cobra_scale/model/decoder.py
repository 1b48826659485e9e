"""Causal pre-LN Transformer blocks with an explicit attention mask and a KV cache.

The mask carries both causality and left padding, so batches of users with different
history lengths share one forward; the cache lets beam search append one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KVCache:
    """Per-layer keys and values, each (B, H, T, dh); ``key_mask`` (B, T) True = attendable."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor

    def repeat_interleave(self, n: int) -> "KVCache":
        """Each row repeated ``n`` times (row b -> rows b*n .. b*n+n-1): beams of one user."""
        return KVCache(
            [k.repeat_interleave(n, 0) for k in self.keys],
            [v.repeat_interleave(n, 0) for v in self.values],
            self.key_mask.repeat_interleave(n, 0),
        )

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep (and reorder) the rows ``rows`` (B',): surviving beams."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.key_mask[rows])


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
        """``x`` (B, T, d); ``mask`` (B, 1, T, T_past+T) bool, True = may attend.

        Returns ``(y (B, T, d), (keys, values))`` with the keys/values of past + new tokens.
        """
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, dh)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, t, d)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, (k, v)


class CausalDecoder(nn.Module):
    """A stack of :class:`Block` with a final LayerNorm."""

    def __init__(self, d: int, layers: int, heads: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, dropout, attention_dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run ``x`` (B, T, d) after the cached tokens.

        Args:
            key_mask: (B, T) True for real tokens of ``x`` (False = left padding).
            cache: tokens already processed (their keys/values and mask).

        Returns:
            ``(hidden (B, T, d), cache including x)``.
        """
        b, t, _ = x.shape
        past_mask = cache.key_mask if cache is not None else key_mask.new_zeros(b, 0)
        full_keys = torch.cat([past_mask, key_mask], dim=1)  # (B, Tp+T)
        tp = past_mask.shape[1]
        causal = torch.ones(t, tp + t, dtype=torch.bool, device=x.device).tril(diagonal=tp)  # (T, Tp+T)
        mask = causal[None] & full_keys[:, None, :]  # (B, T, Tp+T)
        # a fully masked row (a padding query) would give NaN: let it attend to itself
        eye = torch.zeros_like(mask)
        eye[:, torch.arange(t), tp + torch.arange(t)] = True
        mask = (mask | (eye & ~mask.any(-1, keepdim=True)))[:, None]  # (B, 1, T, Tp+T)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, (k, v) = block(x, mask, past)
            keys.append(k)
            values.append(v)
        return self.ln(x), KVCache(keys, values, full_keys)
