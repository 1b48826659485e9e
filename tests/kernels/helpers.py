"""Shared inputs and comparisons of the kernel tests."""

from __future__ import annotations

import torch


def make_batch(
    batch: int,
    num_keys: int,
    dim: int,
    *,
    num_items: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    temperature: float = 0.1,
):
    """Random (queries, keys, positives, temperature, query_item_ids, key_item_ids).

    ``num_items``: keys draw their item ids from that many items (so items repeat in the
    batch, the case the mask exists for) and rows take the id of their positive key;
    None: no ids. Inputs require grad; the temperature is a learnable 0-d tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    keys = torch.randn(num_keys, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    positives = torch.randint(0, num_keys, (batch,), generator=gen)
    temp = torch.tensor(temperature, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        requires_grad=True)
    query_ids = key_ids = None
    if num_items is not None:
        key_ids = torch.randint(0, num_items, (num_keys,), generator=gen)
        query_ids = key_ids[positives]
    return queries, keys, positives, temp, query_ids, key_ids


def loss_and_grads(loss_fn, queries, keys, positives, temperature, query_ids, key_ids, **kwargs):
    """(loss, dL/dqueries, dL/dkeys, dL/dtemperature) of one implementation."""
    loss = loss_fn(queries, keys, positives, temperature, query_ids, key_ids, **kwargs)
    grads = torch.autograd.grad(loss, [queries, keys, temperature])
    return (loss, *grads)


def per_row_loss_and_grads(loss_fn, queries, keys, positives, temperature, query_ids, key_ids, **kwargs):
    """(losses (B,), and the gradients of sum_i w_i loss_i) of ``reduction="none"``, with fixed
    random per-row weights w (some negative), so that the backward's per-row scaling is checked."""
    losses = loss_fn(queries, keys, positives, temperature, query_ids, key_ids, reduction="none", **kwargs)
    assert losses.shape == (queries.shape[0],)
    weights = torch.linspace(-1.0, 2.0, queries.shape[0], dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad((losses * weights).sum(), [queries, keys, temperature])
    return (losses, *grads)
