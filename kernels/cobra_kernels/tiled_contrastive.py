"""Memory-linear cosine contrastive loss in plain PyTorch: the CPU fast path.

The B x N similarity matrix is processed in blocks of ``chunk_size`` query rows. The
forward keeps only the per-row log-sum-exp (B,); the backward recomputes each block of
logits, turns it into ``softmax - onehot`` in place and contracts it straight into the
query and key gradients. Peak extra memory: O((B + N) * d + chunk_size * N) instead of
the reference's several B x N matrices.

Same maths as ``reference.cosine_contrastive_loss_reference`` (see ``_common.py``).
"""

from __future__ import annotations

import torch

from ._common import as_temperature, check_reduction, finish_backward, finish_loss, prepare_inputs, row_weights, same_item_mask

# Elements of one (chunk_size, N) logits block when chunk_size is left to us: 2**24
# (64 MiB in fp32, a constant: memory stays O((B + N) d) + 64 MiB). Measured on 2 cores
# at B = N = 8192: blocks of 128 / 256 / 1024 / 2048 rows took 11 / 5.4 / 3.8 / 3.2 s
# (d = 256) -- every block costs a handful of separate passes and thread wake-ups, and
# the key-gradient update (N x chunk) @ (chunk x d) wants a long inner dimension.
DEFAULT_BLOCK_ELEMENTS = 2**24
MIN_AUTO_CHUNK = 32


def auto_chunk_size(num_rows: int, num_cols: int) -> int:
    """Rows per block: about DEFAULT_BLOCK_ELEMENTS logits, at least MIN_AUTO_CHUNK rows
    (so that a huge gathered N still gets matmuls with some rows)."""
    rows = max(MIN_AUTO_CHUNK, DEFAULT_BLOCK_ELEMENTS // max(num_cols, 1))
    return max(1, min(num_rows, rows))


def _masked_block(
    logits: torch.Tensor,
    rows: slice,
    positives: torch.Tensor,
    query_item_ids: torch.Tensor | None,
    key_item_ids: torch.Tensor | None,
) -> None:
    if query_item_ids is not None:
        mask = same_item_mask(query_item_ids[rows], key_item_ids, positives[rows])
        logits.masked_fill_(mask, float("-inf"))


class TiledCosineContrastiveLoss(torch.autograd.Function):
    """Blocks of whole rows (each block's log-sum-exp is exact, so no online merging is
    needed across blocks); the backward recomputes every block's logits."""

    @staticmethod
    def forward(
        ctx,
        queries: torch.Tensor,  # (B, d)
        keys: torch.Tensor,  # (N, d)
        positives: torch.Tensor,  # (B,) long
        temperature: torch.Tensor,  # 0-d
        query_item_ids: torch.Tensor | None,  # (B,) or None
        key_item_ids: torch.Tensor | None,  # (N,) or None
        chunk_size: int | None,
        reduction: str,
    ) -> torch.Tensor:
        num_rows, num_cols = queries.shape[0], keys.shape[0]
        chunk = chunk_size or auto_chunk_size(num_rows, num_cols)
        _, _, k_unit, _, u = prepare_inputs(queries, keys, temperature)
        lse = torch.empty(num_rows, dtype=u.dtype, device=u.device)  # (B,)
        positive_logits = torch.empty_like(lse)  # (B,)
        block = torch.empty(min(chunk, num_rows), num_cols, dtype=u.dtype, device=u.device)
        k_unit_t = k_unit.t()
        for start in range(0, num_rows, chunk):
            rows = slice(start, min(start + chunk, num_rows))
            n = rows.stop - rows.start
            logits = torch.mm(u[rows], k_unit_t, out=block[:n])  # (n, N)
            _masked_block(logits, rows, positives, query_item_ids, key_item_ids)
            positive_logits[rows] = logits.gather(1, positives[rows, None]).squeeze(1)
            row_max = logits.amax(dim=1)  # finite: the positive column is never masked
            logits.sub_(row_max[:, None]).exp_()
            lse[rows] = row_max + logits.sum(dim=1).log()
        ctx.save_for_backward(queries, keys, positives, temperature, query_item_ids, key_item_ids, lse)
        ctx.chunk = chunk
        ctx.reduction = reduction
        return finish_loss(lse - positive_logits, reduction)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        queries, keys, positives, temperature, query_item_ids, key_item_ids, lse = ctx.saved_tensors
        need_q, need_k, _, need_t = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_t):
            return (None,) * 8
        num_rows, num_cols = queries.shape[0], keys.shape[0]
        chunk = ctx.chunk
        q_unit, q_norm, k_unit, k_norm, u = prepare_inputs(queries, keys, temperature)
        weights = row_weights(grad_out, num_rows, ctx.reduction, u.dtype)  # (B,) dL/dloss_i
        # The temperature gradient is built from dL/dq_unit, so it needs grad_u too.
        grad_u = torch.empty_like(u) if (need_q or need_t) else None  # (B, d)
        grad_k_unit = torch.zeros_like(k_unit) if need_k else None  # (N, d)
        block = torch.empty(min(chunk, num_rows), num_cols, dtype=u.dtype, device=u.device)
        k_unit_t = k_unit.t()
        for start in range(0, num_rows, chunk):
            rows = slice(start, min(start + chunk, num_rows))
            n = rows.stop - rows.start
            probs = torch.mm(u[rows], k_unit_t, out=block[:n])  # (n, N) logits
            _masked_block(probs, rows, positives, query_item_ids, key_item_ids)
            probs.sub_(lse[rows, None]).exp_()  # softmax, masked columns -> 0
            local = torch.arange(n, device=probs.device)
            probs[local, positives[rows]] -= 1.0  # G = softmax - onehot
            # the row weights go on the (n, d) operands, not the (n, N) block: sum_i w_i G_ij u_i = sum_i G_ij (w_i u_i)
            w = weights[rows, None]
            if grad_u is not None:
                torch.mm(probs, k_unit, out=grad_u[rows]).mul_(w)
            if grad_k_unit is not None:
                grad_k_unit.addmm_(probs.t(), u[rows] * w)
        grad_q, grad_k, grad_t = finish_backward(grad_u, grad_k_unit, q_unit, q_norm, k_unit, k_norm, temperature, need_t)
        return (
            grad_q.to(queries.dtype) if need_q else None,
            grad_k.to(keys.dtype) if need_k else None,
            None,
            grad_t.to(temperature.device, temperature.dtype) if need_t else None,
            None,
            None,
            None,
            None,
        )


def cosine_contrastive_loss_tiled(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    query_item_ids: torch.Tensor | None = None,
    key_item_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same contract as ``cosine_contrastive_loss_reference``; ``chunk_size`` query rows
    per block (None: about 16M logits per block, see ``auto_chunk_size``)."""
    check_reduction(reduction)
    if (query_item_ids is None) != (key_item_ids is None):
        query_item_ids = key_item_ids = None  # the reference masks only with both
    return TiledCosineContrastiveLoss.apply(
        queries,
        keys,
        positives,
        as_temperature(temperature, queries),
        query_item_ids,
        key_item_ids,
        chunk_size,
        reduction,
    )
