"""The item text encoder's pooling: [CLS] (paper) or the mean over real tokens."""

import pytest
import torch

from cobra_scale.errors import ConfigError
from cobra_scale.model.config import CobraConfig
from cobra_scale.model.text_encoder import ItemTextEncoder


def encoder(pooling):
    torch.manual_seed(0)
    return ItemTextEncoder(vocab_size=200, dim=32, layers=1, heads=2, max_tokens=10, out_dim=16, dropout=0.0, pooling=pooling).eval()


def texts(n=64):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 200, (n, 10), generator=g)
    tokens[:, 0] = 1  # [CLS]
    return tokens, torch.ones_like(tokens)


def mean_pairwise_cos(v):
    v = torch.nn.functional.normalize(v, dim=-1)
    c = v @ v.T
    return float(c[~torch.eye(len(c), dtype=torch.bool)].mean())


def test_cls_output_starts_collapsed_and_mean_pooling_does_not():
    """At initialisation the text barely reaches position 0: every [CLS] vector is the same."""
    tokens, mask = texts()
    with torch.no_grad():
        cls = encoder("cls")(tokens, mask)
        mean = encoder("mean")(tokens, mask)
    assert mean_pairwise_cos(cls) > 0.99
    assert mean_pairwise_cos(mean) < mean_pairwise_cos(cls) - 0.05


def test_mean_pooling_ignores_padding():
    enc = encoder("mean")
    tokens, mask = texts(4)
    padded = torch.cat([tokens[:, :6], torch.zeros(4, 4, dtype=torch.long)], 1)
    pmask = torch.cat([mask[:, :6], torch.zeros(4, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(enc(padded, pmask), enc(tokens[:, :6], mask[:, :6]), atol=1e-5)


def test_bad_pooling_is_a_config_error():
    with pytest.raises(ConfigError):
        CobraConfig(text_pooling="max")
    with pytest.raises(ValueError):
        encoder("max")
