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
    """Per-layer keys and values, each (R, H, T, dh); ``key_mask`` (R, T) True = attendable.

    With ``shared`` set, row ``r`` also attends to row ``r // group`` of ``shared`` first (its
    keys come before this cache's own): the beams of one user share the user's history once
    instead of each holding a copy of it (beam search appends a few tokens per beam to a
    history of ~4 tokens per item).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor
    shared: "KVCache | None" = None
    group: int = 1

    @property
    def rows(self) -> int:
        return int(self.key_mask.shape[0])

    def repeat_interleave(self, n: int) -> "KVCache":
        """Each row repeated ``n`` times (row b -> rows b*n .. b*n+n-1): beams of one user.

        The rows' tokens become a shared prefix; nothing is copied.
        """
        if self.shared is not None:
            return KVCache([k.repeat_interleave(n, 0) for k in self.keys], [v.repeat_interleave(n, 0) for v in self.values],
                           self.key_mask.repeat_interleave(n, 0), self.shared, self.group * n)
        empty = [k.new_zeros(k.shape[0] * n, k.shape[1], 0, k.shape[3]) for k in self.keys]
        return KVCache(empty, list(empty), self.key_mask.new_zeros(self.rows * n, 0), self, n)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep (and reorder) the rows ``rows`` (R',): surviving beams.

        With a shared prefix, every shared row must keep the same number of rows and each
        new row must come from a row of the same shared row (beams stay with their user).
        """
        own = ([k[rows] for k in self.keys], [v[rows] for v in self.values], self.key_mask[rows])
        if self.shared is None:
            return KVCache(*own)
        users = self.shared.rows
        if len(rows) % users:
            raise ValueError(f"select: {len(rows)} rows do not split evenly over {users} shared rows")
        return KVCache(*own, self.shared, len(rows) // users)

    def materialize(self) -> "KVCache":
        """The same cache with the shared prefix copied into every row (tests, debugging)."""
        if self.shared is None:
            return self
        base = self.shared.materialize()
        idx = torch.arange(self.rows, device=self.key_mask.device) // self.group
        return KVCache(
            [torch.cat([bk[idx], k], dim=2) for bk, k in zip(base.keys, self.keys)],
            [torch.cat([bv[idx], v], dim=2) for bv, v in zip(base.values, self.values)],
            torch.cat([base.key_mask[idx], self.key_mask], dim=1),
        )


def _grouped_attention(q, k, v, mask, shared_k, shared_v, shared_mask, group: int) -> torch.Tensor:
    """Attention of ``q`` (R, H, t, dh) over a shared prefix plus each row's own keys.

    ``k``/``v`` (R, H, To, dh) with ``mask`` (R, 1, t, To); ``shared_k``/``shared_v``
    (U, H, Ts, dh) with ``shared_mask`` (U, Ts), row r seeing shared row r // group
    (R = U * group). One softmax over both parts; the prefix is never repeated.
    """
    r, h, t, dh = q.shape
    u = shared_k.shape[0]
    scale = dh**-0.5
    own = (q @ k.transpose(-1, -2)) * scale  # (R, H, t, To)
    own = own.masked_fill(~mask, float("-inf"))
    qg = q.view(u, group, h, t, dh).transpose(1, 2).reshape(u, h, group * t, dh)
    pre = (qg @ shared_k.transpose(-1, -2)) * scale  # (U, H, g*t, Ts)
    pre = pre.masked_fill(~shared_mask[:, None, None, :], float("-inf"))
    ts = pre.shape[-1]
    pre = pre.view(u, h, group, t, ts).transpose(1, 2).reshape(r, h, t, ts)
    w = torch.softmax(torch.cat([pre, own], dim=-1), dim=-1)
    w_pre, w_own = w[..., :ts], w[..., ts:]
    out = w_own @ v
    w_pre = w_pre.reshape(u, group, h, t, ts).transpose(1, 2).reshape(u, h, group * t, ts)
    out_pre = (w_pre @ shared_v).view(u, h, group, t, dh).transpose(1, 2).reshape(r, h, t, dh)
    return out + out_pre


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, shared=None):
        """``x`` (B, T, d); ``mask`` (B, 1, T, T_past+T) bool, True = may attend.

        ``shared`` = ``(keys, values, key_mask, group)`` of a shared prefix (see :class:`KVCache`).
        Returns ``(y (B, T, d), (keys, values))`` with the keys/values of past + new tokens.
        """
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, dh)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if shared is None:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        else:
            att = _grouped_attention(q, k, v, mask, *shared)
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
        shared = cache.shared if cache is not None else None  # never nested: repeat_interleave keeps one level
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            prefix = (shared.keys[i], shared.values[i], shared.key_mask, cache.group) if shared is not None else None
            x, (k, v) = block(x, mask, past, prefix)
            keys.append(k)
            values.append(v)
        return self.ln(x), KVCache(keys, values, full_keys, shared, cache.group if shared is not None else 1)
