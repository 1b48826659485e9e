"""The specification of the in-batch cosine contrastive loss: a plain B x N matrix.

Every fast path (tiled PyTorch, Triton) is held to this function by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_reduction


def cosine_contrastive_loss_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    query_item_ids: torch.Tensor | None = None,
    key_item_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or, with ``reduction="none"``, each) over rows of ``-log softmax_j(cos(q_i, k_j) / temperature)[positives[i]]``.

    Args:
        queries: (B, d) predicted vectors (any norm; L2-normalised here).
        keys: (N, d) item vectors of the batch (any norm; L2-normalised here).
        positives: (B,) long, index into ``keys`` of each row's true item.
        temperature: scalar (float or 0-d tensor, may require grad), > 0.
        query_item_ids: (B,) item id of each row's target; with ``key_item_ids`` (N,),
            columns ``j != positives[i]`` holding the same item id as row ``i``'s target
            are masked out (the same item elsewhere in the batch is not a negative).
        reduction: "mean" (default) or "none" (the (B,) per-row losses).

    Returns:
        0-d tensor, the mean loss; (B,) with ``reduction="none"``.
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = q @ k.T / temperature  # (B, N)
    if query_item_ids is not None and key_item_ids is not None:
        same = query_item_ids[:, None] == key_item_ids[None, :]  # (B, N)
        same[torch.arange(len(positives), device=positives.device), positives] = False
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, positives, reduction=check_reduction(reduction))
