"""Inference on CUDA gives what it gives on CPU (every mode, a history sent from the host).

Skipped without a GPU; run on a lent GPU machine by ``tools/gpu_check.sh``. Session 40 found by reading that
``Recommender`` built its ID trie from ``item_codes.numpy()``, which fails on a CUDA tensor, so the serve engine's
``device: auto`` had never worked on a GPU: these tests are the check that it does now.
"""

import copy
import os

import pytest
import torch

from cobra_scale.retrieve.recommender import InferenceParams, Recommender
from tests.model.test_cobra import K, catalogue, tiny_model

# COBRA_TEST_DEVICE=cpu runs the same checks CPU against CPU: how the tests themselves are checked on a machine without a GPU
DEVICE = os.environ.get("COBRA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

HISTORY = torch.tensor([[-1, -1, 2, 7], [5, 6, 3, 5], [-1, 0, 11, 4]])
SETTINGS = [
    InferenceParams("cobra", 4, psi=20.0),
    InferenceParams("cobra", 4, psi=20.0, exclude_history=True, free_query_weight=0.5, free_mix_weight=0.3),
    InferenceParams("no_fusion", 1),
    InferenceParams("dense_only", 1, exclude_history=True),
    InferenceParams("liger", 4),
]


def _pair(**kw):
    model = tiny_model(**kw)
    tokens, mask, codes = catalogue()
    codes = torch.stack([torch.arange(12) % 2, torch.zeros(12, dtype=torch.long)], 1)  # two IDs of six items each
    with torch.no_grad():
        vectors = model.encode_items(tokens, mask)
    cpu = Recommender(model, codes, vectors, cold_items=torch.tensor([3]))
    dev = torch.device(DEVICE)
    gpu = Recommender(copy.deepcopy(model).to(dev), codes.to(dev), vectors.to(dev), cold_items=torch.tensor([3]))
    return cpu, gpu


def _same(a, b):
    items_a, scores_a = a
    items_b, scores_b = b
    assert items_b.device.type == DEVICE
    assert torch.equal(items_a, items_b.cpu())
    assert torch.allclose(scores_a.float(), scores_b.float().cpu(), atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"{p.mode}-{p.free_mix_weight}")
def test_recommend_on_cuda_matches_cpu(params):
    cpu, gpu = _pair(history_dense_weight=1.0, successor_embedding=True, successor_context=2, catalogue_items=12)
    _same(cpu.recommend(HISTORY, 6, params), gpu.recommend(HISTORY, 6, params))  # the history stays on the host


def test_recommend_many_on_cuda_matches_cpu():
    cpu, gpu = _pair(history_dense_weight=1.0)
    for a, b in zip(cpu.recommend_many(HISTORY, 6, SETTINGS[:2]), gpu.recommend_many(HISTORY.to(DEVICE), 6, SETTINGS[:2])):
        _same(a, b)


def test_sparse_only_on_cuda_matches_cpu():
    model = tiny_model(use_dense=False)
    codes = torch.stack([torch.arange(12) % K, (torch.arange(12) // K) % K], 1)  # one item per ID
    cpu = Recommender(model, codes, None)
    gpu = Recommender(copy.deepcopy(model).to(DEVICE), codes.to(DEVICE), None)
    params = InferenceParams("sparse_only", 6)
    _same(cpu.recommend(HISTORY, 6, params), gpu.recommend(HISTORY, 6, params))
