"""A tiny trained run (1 epoch on ``tiny_dataset``) for the index and evaluation tests."""

from __future__ import annotations

from pathlib import Path

from cobra_scale.config import load_config
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import run as train
from tests.model.fixtures import tiny_dataset

SMALL = [
    "model.d_model=32", "model.encoder_dim=32", "model.decoder_heads=2", "model.encoder_heads=2", "model.text_tokens=12",
    "batch_size=32", "lr=3e-3", "warmup_steps=5", "inference.beams=8", "init_embeddings=false", "epochs=1",
]


def tiny_run(root: Path, *extra: str) -> Path:
    """Train one epoch on a tiny dataset under ``root``; returns the run folder."""
    data = tiny_dataset(root / "data")
    out = root / "run"
    train(load_config(TrainConfig, dotlist=[f"data={data}", f"ids={data / 'ids'}", f"out={out}", *SMALL, *extra]))
    return out
