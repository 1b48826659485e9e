"""A tiny trained run shared by the serving tests (one short `cobra train` per session)."""

import pytest

from cobra_scale.config import load_config
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import run as train
from tests.model.fixtures import tiny_dataset

SMALL = [
    "model.d_model=32", "model.encoder_dim=32", "model.decoder_heads=2", "model.encoder_heads=2", "model.text_tokens=12",
    "batch_size=32", "lr=3e-3", "warmup_steps=5", "inference.beams=8", "init_embeddings=false", "threads=1",
]


def train_tiny(data, out, *extra):
    cfg = load_config(TrainConfig, dotlist=[f"data={data}", f"ids={data / 'ids'}", f"out={out}", *SMALL, *extra])
    train(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("serve_tiny"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """Two epochs on the i -> i+1 walk: enough for non-trivial beams."""
    return train_tiny(tiny_data, tmp_path_factory.mktemp("serve_run") / "run", "epochs=2")
