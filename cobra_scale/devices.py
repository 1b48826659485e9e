"""The one place that turns a ``device`` config value into a device."""

from __future__ import annotations

from cobra_scale.errors import ConfigError


def pick_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; checks ``"cuda"`` exists."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible")
    return device


def pick_precision(precision: str, device: str) -> str:
    """The autocast precision to use on ``device``: ``bf16`` falls back to ``fp32`` where it would be slow.

    On a CPU without native bf16 (no AVX512-BF16 / AMX) oneDNN emulates bf16 matmuls, which
    was measured ~50x slower than fp32 on an AVX2-only EPYC; training there in bf16 is never
    what the user wants, so this warns once and trains in fp32.
    """
    import logging

    import torch

    if precision != "bf16" or device != "cpu":
        return precision
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if native:
        return precision
    logging.getLogger(__name__).warning("precision=bf16 requested but this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32")
    return "fp32"
