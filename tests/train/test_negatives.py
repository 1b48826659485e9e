"""Catalogue-wide dense negatives (VectorBank) and the optional per-item embedding."""

import numpy as np
import pytest
import torch

from cobra_scale.errors import ConfigError
from cobra_scale.model.cobra import Batch, CobraModel
from cobra_scale.model.config import CobraConfig
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.negatives import VectorBank
from tests.model.test_cobra import catalogue, tiny_model


def test_bank_never_draws_batch_or_held_out_items():
    held = np.zeros(10, dtype=bool)
    held[[2, 7]] = True
    bank = VectorBank(torch.randn(10, 4), -1, held)
    vecs, ids = bank.sample(torch.tensor([0, 3, 3]))
    assert sorted(ids.tolist()) == [1, 4, 5, 6, 8, 9]
    assert torch.equal(vecs, bank.vectors[ids])
    sampled = VectorBank(torch.randn(10, 4), 3, held)
    for seed in range(20):
        _, ids = sampled.sample(torch.tensor([0]), torch.Generator().manual_seed(seed))
        assert len(ids) <= 3 and not set(ids.tolist()) & {0, 2, 7}


def test_bank_update_and_refresh_replace_rows():
    bank = VectorBank(torch.zeros(5, 3), -1)
    bank.update(torch.tensor([1, 4]), torch.ones(2, 3))
    assert bank.vectors.sum(1).tolist() == [0, 3, 0, 0, 3]
    bank.refresh(torch.full((5, 3), 2.0))
    assert (bank.vectors == 2).all()
    with pytest.raises(ValueError):
        bank.refresh(torch.zeros(4, 3))


def test_extra_keys_make_the_dense_loss_a_softmax_over_the_catalogue():
    """Batch items {0..5} plus the bank's other items {6..11} give the loss of a batch that
    encodes all 12 items: the bank stands in for encoding the whole catalogue."""
    model = tiny_model(random_prefix=False)
    tokens, mask, codes = catalogue()
    seq = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sub = torch.arange(6)
    small = model(Batch(tokens[sub], mask[sub], codes[sub], sub, seq))
    bank = VectorBank(model.encode_items(tokens, mask).detach(), -1)
    extra, extra_ids = bank.sample(sub)
    assert sorted(extra_ids.tolist()) == list(range(6, 12))
    with_bank = model(Batch(tokens[sub], mask[sub], codes[sub], sub, seq), extra, extra_ids)
    everything = model(Batch(tokens, mask, codes, torch.arange(12), seq))
    assert float(with_bank.dense.detach()) == pytest.approx(float(everything.dense.detach()), abs=1e-5)
    assert float(with_bank.dense.detach()) > float(small.dense.detach())  # more negatives: a harder softmax
    assert with_bank.item_vectors.shape == (6, 16) and not with_bank.item_vectors.requires_grad


def test_item_embedding_adds_a_row_per_known_item_only():
    model = tiny_model(random_prefix=False, item_embedding=True, catalogue_items=8)
    tokens, mask, _ = catalogue()
    text = model.encode_items(tokens, mask)
    assert torch.equal(model.encode_items(tokens, mask, torch.arange(12)), text)  # zero-initialised: text alone
    with torch.no_grad():
        model.item_emb.weight.fill_(1.0)
    got = model.encode_items(tokens, mask, torch.arange(12))
    assert torch.allclose(got[:8], text[:8] + 1.0)
    assert torch.equal(got[8:], text[8:])  # beyond the table (items added after training): text only
    assert torch.equal(model.encode_items(tokens, mask), text)  # no indices: text only


def test_item_embedding_trains_only_the_rows_it_sees():
    model = tiny_model(random_prefix=False, item_embedding=True, catalogue_items=12).train()
    tokens, mask, codes = catalogue()
    seen = torch.arange(8)  # the batch's items; 8..11 are never in it
    out = model(Batch(tokens[seen], mask[seen], codes[seen], seen, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])))
    out.total.backward()
    grad = model.item_emb.weight.grad.abs().sum(1)
    assert (grad[:8] > 0).all() and (grad[8:] == 0).all()


def test_config_errors():
    with pytest.raises(ConfigError):
        CobraModel(CobraConfig(item_embedding=True))
    with pytest.raises(ConfigError):
        TrainConfig(data="d", ids="i", out="o", catalogue_negatives=-2)
    with pytest.raises(ConfigError):
        TrainConfig(data="d", ids="i", out="o", catalogue_negatives=-1, launcher="ray")
