"""``embed.pooling=static``: the mean of the model's input token embeddings, no transformer layers."""

import numpy as np
import pytest

from cobra_scale.errors import ConfigError
from cobra_scale.semantic_ids.configs import EmbedConfig
from cobra_scale.semantic_ids.embed import TextEmbedder, embed_texts


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder(pooling="static", max_length=32, device="cpu")


def test_static_is_the_mean_of_input_embeddings_over_non_special_tokens(embedder):
    texts = ["red lipstick matte", "shampoo"]
    got = embedder(texts)
    table = embedder.model.get_input_embeddings().weight.detach().numpy()
    for text, vec in zip(texts, got):
        ids = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
        want = table[ids].mean(0)
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(vec, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_static_ignores_padding_and_word_order(embedder):
    # batched with a longer text (padding) or alone, and with words swapped: same bag of pieces
    alone = embedder(["matte red lipstick"])[0]
    padded = embedder(["red lipstick matte", "a much longer title with many more word pieces than the first"])[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_static_separates_texts_and_keeps_input_order(embedder):
    texts = ["vitamin c serum", "hair dryer ionic", "vitamin c serum", "nail polish remover"]
    out = embed_texts(texts, embedder, batch_size=2, progress=False)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    assert float(out[0] @ out[1]) < 0.99


def test_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="static"):
        EmbedConfig(pooling="max")
