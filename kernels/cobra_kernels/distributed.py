"""Cross-worker negatives: every rank scores its queries against the item vectors of all
ranks, and the gradients of those vectors flow back to the rank that owns them.

Only ``torch.distributed`` (any backend: gloo on CPU, NCCL on GPU); no Ray, no DeepSpeed.

What is equal to what (W ranks, rank r holds B_r queries and N_r keys)::

    loss_r = mean over rank r's rows of the loss against all sum_r N_r keys

With equal B_r, the single-process loss on the concatenated batch is
``L = mean_r loss_r``. After ``loss_r.backward()`` on every rank:

* rank r's query gradient is ``dloss_r/dq_r = W * dL/dq_r``;
* rank r's key gradient is ``sum_s dloss_s/dk_r = W * dL/dk_r`` (the backward of the
  gather sums the contributions of all ranks to the owner's slice);
* the temperature gradient is ``dloss_r/dtau`` (local).

So every parameter gradient on rank r is W times rank r's share of ``dL/dtheta``, and
DDP / DeepSpeed's gradient *averaging* over ranks yields exactly ``dL/dtheta``: training
with this loss under data parallelism equals training on the concatenated batch. (With
unequal B_r the averaged objective is ``mean_r loss_r``, which weights rows of smaller
ranks more.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from . import cosine_contrastive_loss


class GatheredKeys(NamedTuple):
    keys: torch.Tensor  # (sum_r N_r, d), rank order; differentiable w.r.t. the local keys
    item_ids: torch.Tensor | None  # (sum_r N_r,) or None
    offset: int  # index of this rank's first key in ``keys``: local positives + offset


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_sizes(rows: int, device: torch.device, group) -> list[int]:
    world, _ = _world(group)
    local = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dims are ``sizes`` (all_gather
    wants equal shapes, so each is padded to the largest)."""
    world, rank = _world(group)
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] != longest:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: each rank's gradient of the gathered
    tensor is summed over ranks and the owner keeps its own slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, group = ctx.sizes, ctx.group
        world, rank = _world(group)
        offset = sum(sizes[:rank])
        if dist.get_backend(group) == "nccl":
            # One reduce-scatter over equal, padded slices.
            longest = max(sizes)
            padded = grad.new_zeros((world * longest, *grad.shape[1:]))
            start = 0
            for r, size in enumerate(sizes):
                padded[r * longest : r * longest + size] = grad[start : start + size]
                start += size
            mine = grad.new_empty((longest, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, padded, group=group)
            return mine[: sizes[rank]], None, None
        # gloo has no reduce_scatter: all-reduce the whole gradient, keep our slice.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[offset : offset + sizes[rank]], None, None


def gather_keys_with_grad(
    keys: torch.Tensor, key_item_ids: torch.Tensor | None = None, group=None
) -> GatheredKeys:
    """All ranks' item vectors (N_r may differ), gradients flowing back to their owners.

    Args:
        keys: (N_r, d) this rank's item vectors.
        key_item_ids: (N_r,) their item ids, gathered alongside (no gradient), or None.
        group: process group (default: the world).

    Returns:
        ``GatheredKeys(keys, item_ids, offset)``; shift this rank's positives by
        ``offset`` to index the gathered keys.
    """
    _, rank = _world(group)
    sizes = _gather_sizes(keys.shape[0], keys.device, group)
    gathered = _AllGatherWithGrad.apply(keys, sizes, group)
    item_ids = None
    if key_item_ids is not None:
        item_ids = _all_gather_padded(key_item_ids, sizes, group)
    return GatheredKeys(gathered, item_ids, sum(sizes[:rank]))


def global_cosine_contrastive_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    query_item_ids: torch.Tensor | None = None,
    key_item_ids: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    group=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``cosine_contrastive_loss`` of this rank's queries against the keys of all ranks.

    ``positives`` index this rank's *local* ``keys``; the same item on another rank is
    masked when both item id tensors are given. Without an initialised process group
    (or with one rank) this is the plain local loss. See the module docstring for how
    the result and its gradients relate to the loss on the concatenated batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return cosine_contrastive_loss(
            queries, keys, positives, temperature, query_item_ids, key_item_ids, impl=impl, chunk_size=chunk_size, reduction=reduction
        )
    gathered = gather_keys_with_grad(keys, key_item_ids if query_item_ids is not None else None, group)
    return cosine_contrastive_loss(
        queries,
        gathered.keys,
        positives + gathered.offset,
        temperature,
        query_item_ids,
        gathered.item_ids,
        impl=impl,
        chunk_size=chunk_size,
        reduction=reduction,
    )
