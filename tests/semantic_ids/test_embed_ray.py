"""The Ray Data actor-pool embedding path gives the same vectors as the local path."""

import numpy as np
import pytest

from cobra_scale.semantic_ids.configs import EmbedConfig
from cobra_scale.semantic_ids.embed import embed_items
from tests.semantic_ids.test_ids_command import catalogue


@pytest.mark.integration
def test_ray_backend_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    items = catalogue(n_per_topic=5)
    try:
        _, local, _ = embed_items(items, EmbedConfig(batch_size=8), None)
        ids, remote, n = embed_items(items, EmbedConfig(backend="ray", ray_actors=1, batch_size=8), None)
    finally:
        ray.shutdown()
    assert n == 20 and ids.tolist() == list(range(20))
    np.testing.assert_allclose(remote, local, atol=1e-5)
