"""Maths shared by the fast paths: L2 normalisation around the similarity core, its
backward, and the temperature gradient.

Every fast path computes the loss of ``reference.py`` as

    u_i = q_i / (max(||q_i||, eps) * tau)          # (B, d) scaled unit queries
    kh_j = k_j / max(||k_j||, eps)                 # (N, d) unit keys
    s_ij = u_i . kh_j                              # never materialised as (B, N)
    loss_i = logsumexp_{j unmasked} s_ij - s_{i, p_i}
    loss = mean_i loss_i     (reduction="mean"; reduction="none" returns loss_i)

and the core (tiled torch or Triton) only returns ``dloss/du`` and ``dloss/dkh``, with
each row's ``G_i = softmax_i - onehot(p_i)`` weighted by ``w_i = dL/dloss_i``
(``row_weights``); this module turns them into gradients for the raw queries, keys and
the temperature:

    dL/dqh_i  = dL/du_i / tau
    dL/dtau   = -(1/tau) * sum_i qh_i . dL/dqh_i     (s depends on tau only via u = qh/tau)
    dL/dq_i   = (dL/dqh_i - qh_i (qh_i . dL/dqh_i)) / ||q_i||    (F.normalize's backward)
"""

from __future__ import annotations

import torch

# F.normalize's default eps: norms below it are clamped, and then the map is x / eps.
NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (as the reference's ``.float()``), fp64 stays fp64
    (so that ``torch.autograd.gradcheck`` can check the fast paths in double)."""
    return torch.promote_types(dtype, torch.float32)


def as_temperature(temperature: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """0-d tensor on ``like``'s device; a tensor keeps its autograd graph."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        return temperature.reshape(())
    return torch.tensor(float(temperature), dtype=compute_dtype(like.dtype), device=like.device)


def l2_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x / max(||x||, eps), ||x||) row-wise; x: (R, d), norms: (R,)."""
    norm = torch.linalg.vector_norm(x, dim=-1)  # (R,)
    return x / norm.clamp_min(NORM_EPS)[:, None], norm


def l2_normalize_backward_(
    grad_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``l2_normalize``, in place on ``grad_unit`` (R, d).

    Returns (grad_x, dots) where ``dots[i] = unit_i . grad_unit_i`` (before the update),
    which the temperature gradient reuses.
    """
    dots = torch.linalg.vecdot(unit, grad_unit)  # (R,)
    # Where the norm was clamped, clamp_min passes no gradient: only the x / eps part.
    projected = torch.where(norm >= NORM_EPS, dots, torch.zeros_like(dots))
    grad_unit.addcmul_(unit, projected[:, None], value=-1.0)
    grad_unit.div_(norm.clamp_min(NORM_EPS)[:, None])
    return grad_unit, dots


def prepare_inputs(
    queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit vectors in the compute dtype. Returns (q_unit, q_norm, k_unit, k_norm, u)
    with ``u = q_unit / temperature`` so that logits are plain dot products u . k_unit."""
    dtype = compute_dtype(torch.promote_types(queries.dtype, keys.dtype))
    q_unit, q_norm = l2_normalize(queries.to(dtype))
    k_unit, k_norm = l2_normalize(keys.to(dtype))
    u = q_unit / temperature.to(dtype)
    return q_unit, q_norm, k_unit, k_norm, u


REDUCTIONS = ("mean", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def finish_loss(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-row losses -> the mean (0-d) or themselves."""
    return per_row.mean() if reduction == "mean" else per_row


def row_weights(grad_out: torch.Tensor, num_rows: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """(B,) ``dL/dloss_i``: ``grad_out / B`` for every row of a mean, ``grad_out`` itself for reduction="none"."""
    grad_out = grad_out.to(dtype)
    if reduction == "mean":
        return (grad_out / num_rows).reshape(1).expand(num_rows).contiguous()
    return grad_out.reshape(num_rows).contiguous()


def finish_backward(
    grad_u: torch.Tensor | None,
    grad_k_unit: torch.Tensor | None,
    q_unit: torch.Tensor,
    q_norm: torch.Tensor,
    k_unit: torch.Tensor,
    k_norm: torch.Tensor,
    temperature: torch.Tensor,
    needs_temperature_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Turns the core's sums into gradients of the loss.

    ``grad_u`` (B, d) = sum_j w_i G_ij kh_j and ``grad_k_unit`` (N, d) = sum_i w_i G_ij u_i
    with G = softmax - onehot(positive) and ``w = row_weights(...)``; both are updated in
    place. Returns (grad_queries, grad_keys, grad_temperature) in the compute dtype.
    """
    t = temperature.to(q_unit.dtype)
    grad_q = grad_k = grad_t = None
    if grad_u is not None:
        grad_q_unit = grad_u.div_(t)  # dL/dqh = dL/du / tau
        grad_q, dots = l2_normalize_backward_(grad_q_unit, q_unit, q_norm)
        if needs_temperature_grad:
            grad_t = -dots.sum() / t
    if grad_k_unit is not None:
        grad_k, _ = l2_normalize_backward_(grad_k_unit, k_unit, k_norm)
    return grad_q, grad_k, grad_t


def same_item_mask(
    query_item_ids: torch.Tensor, key_item_ids: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """(R, N) bool, True where column j holds row i's item and j is not its positive."""
    same = query_item_ids[:, None] == key_item_ids[None, :]
    same[torch.arange(len(positives), device=positives.device), positives] = False
    return same
