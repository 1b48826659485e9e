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
