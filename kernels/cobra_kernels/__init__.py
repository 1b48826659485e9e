"""Fused kernels for cobra_scale (see kernels/README.md).

The importable package is ``cobra_kernels`` (nested under the top-level
``kernels/`` folder) so that it never shadows Hugging Face's ``kernels``
package, which ``transformers`` probes for.

Example::

    from cobra_kernels import cosine_contrastive_loss, resolve_impl

    loss = cosine_contrastive_loss(pred_vectors, item_vectors, positives, temperature)
    log.info("contrastive loss impl: %s", resolve_impl("auto", pred_vectors.device))
"""

from __future__ import annotations

import enum
import logging

import torch

from .reference import cosine_contrastive_loss_reference
from .tiled_contrastive import cosine_contrastive_loss_tiled

__all__ = [
    "ContrastiveImpl",
    "cosine_contrastive_loss",
    "cosine_contrastive_loss_reference",
    "cosine_contrastive_loss_tiled",
    "resolve_impl",
]

logger = logging.getLogger("cobra_kernels")


class ContrastiveImpl(str, enum.Enum):
    """Implementations of the in-batch cosine contrastive loss."""

    AUTO = "auto"  # triton on CUDA tensors, tiled elsewhere
    REFERENCE = "reference"  # plain B x N matrix: the spec (reference.py)
    TILED = "tiled"  # row blocks + recompute in backward, pure PyTorch (CPU path)
    TRITON = "triton"  # fused Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def resolve_impl(impl: str | ContrastiveImpl = "auto", device: torch.device | str = "cpu") -> str:
    """The implementation ``cosine_contrastive_loss`` runs for ``impl`` on ``device``.

    ``"auto"`` resolves to ``"triton"`` on CUDA when triton imports, else ``"tiled"``.
    Explicit choices are returned as they are (validated).
    """
    choice = ContrastiveImpl(impl.value if isinstance(impl, ContrastiveImpl) else str(impl).lower())
    if choice is not ContrastiveImpl.AUTO:
        return choice.value
    device = torch.device(device)
    return ContrastiveImpl.TRITON.value if _triton_usable(device) else ContrastiveImpl.TILED.value


_logged: set[tuple[str, str, str]] = set()


def _log_once(requested: str, resolved: str, device: torch.device) -> None:
    key = (requested, resolved, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("cosine_contrastive_loss: impl=%s (requested %s) on %s", resolved, requested, device.type)


def cosine_contrastive_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    query_item_ids: torch.Tensor | None = None,
    key_item_ids: torch.Tensor | None = None,
    impl: str | ContrastiveImpl = "auto",
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean in-batch cosine contrastive loss (the contract of ``reference.py``).

    Args:
        queries: (B, d) predicted vectors, any norm, fp32/bf16/fp16 (fp64 on CPU).
        keys: (N, d) item vectors of the (possibly gathered) batch.
        positives: (B,) long, column of each row's true item in ``keys``.
        temperature: scalar > 0, float or 0-d tensor (gradient computed if it requires one).
        query_item_ids, key_item_ids: (B,), (N,) item ids; with both, columns holding a
            row's item other than its positive are masked out.
        impl: "auto" | "reference" | "tiled" | "triton" (or a ``ContrastiveImpl``).
        chunk_size: query rows per block of the tiled path (None: automatic); ignored by
            the other implementations.
        reduction: "mean" (default), or "none" for the (B,) per-row losses (their
            backward takes a per-row gradient, e.g. for a loss built on top of them).

    Returns:
        0-d fp32 (fp64 for fp64 inputs on the fast paths) tensor; (B,) with ``reduction="none"``.
    """
    requested = impl.value if isinstance(impl, ContrastiveImpl) else str(impl).lower()
    resolved = resolve_impl(requested, queries.device)
    _log_once(requested, resolved, queries.device)
    if resolved == ContrastiveImpl.REFERENCE.value:
        return cosine_contrastive_loss_reference(
            queries, keys, positives, temperature, query_item_ids, key_item_ids, reduction=reduction
        )
    if resolved == ContrastiveImpl.TILED.value:
        return cosine_contrastive_loss_tiled(
            queries, keys, positives, temperature, query_item_ids, key_item_ids, chunk_size=chunk_size, reduction=reduction
        )
    # Imported lazily: TRITON_INTERPRET must be read when the @triton.jit kernels are defined.
    from . import triton_contrastive

    if queries.device.type != "cuda" and not triton_contrastive.INTERPRETED:
        raise RuntimeError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "cobra_kernels.triton_contrastive is first imported); use impl='tiled' on CPU"
        )
    return triton_contrastive.cosine_contrastive_loss_triton(
        queries, keys, positives, temperature, query_item_ids, key_item_ids, reduction=reduction
    )
