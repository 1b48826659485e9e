"""Catalogue-wide dense negatives (VectorBank) and the optional per-item embedding."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cobra_scale.errors import ConfigError
from cobra_scale.model.cobra import Batch, CobraModel
from cobra_scale.model.config import CobraConfig
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.data import id_groups
from cobra_scale.train.negatives import VectorBank, same_id_candidates
from tests.model.test_cobra import catalogue, tiny_model


def test_bank_keys_hold_the_batch_and_never_held_out_items():
    held = np.zeros(10, dtype=bool)
    held[[2, 7]] = True
    bank = VectorBank(torch.randn(10, 4), -1, held)
    vecs, ids = bank.sample(torch.tensor([0, 3, 3]))
    assert ids.tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
    assert torch.equal(vecs, bank.vectors[ids])
    sampled = VectorBank(torch.randn(10, 4), 3, held)
    for seed in range(20):
        _, ids = sampled.sample(torch.tensor([0, 5]), torch.Generator().manual_seed(seed))
        assert {0, 5} <= set(ids.tolist()) and len(ids) <= 5 and not set(ids.tolist()) & {2, 7}
        assert ids.tolist() == sorted(ids.tolist())


def test_bank_update_and_refresh_replace_rows():
    bank = VectorBank(torch.zeros(5, 3), -1)
    bank.update(torch.tensor([1, 4]), torch.ones(2, 3))
    assert bank.vectors.sum(1).tolist() == [0, 3, 0, 0, 3]
    bank.refresh(torch.full((5, 3), 2.0))
    assert (bank.vectors == 2).all()
    with pytest.raises(ValueError):
        bank.refresh(torch.zeros(4, 3))


def losses_and_predictions(model, batch):
    """``(losses, {"pred": the dense predictions (P, d), "t": the temperature})`` of one forward pass,
    the predictions caught where they enter the in-batch dense loss."""
    import cobra_scale.model.cobra as cobra_mod

    captured = {}
    original = cobra_mod.dense_contrastive_loss

    def spy(pred, k, pos, t, *a, **kw):
        captured.setdefault("pred", pred.detach())
        captured.setdefault("t", float(t))
        return original(pred, k, pos, t, *a, **kw)

    cobra_mod.dense_contrastive_loss = spy
    try:
        return model(batch), captured
    finally:
        cobra_mod.dense_contrastive_loss = original


def test_bank_term_is_a_softmax_over_the_bank_with_the_targets_bank_vector_as_positive():
    """The catalogue term equals the in-batch loss of a batch whose keys are the bank's vectors."""
    from cobra_kernels import cosine_contrastive_loss_reference

    model = tiny_model(random_prefix=False)
    tokens, mask, codes = catalogue()
    seq = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sub = torch.arange(6)
    batch = Batch(tokens[sub], mask[sub], codes[sub], sub, seq)
    base = model(batch)
    bank = VectorBank(torch.randn(12, 16), -1)
    keys, ids = bank.sample(sub)
    with_bank = model(batch, keys, ids)
    # the predictions, recovered from the model's own in-batch term: rerun it with the bank as the batch's vectors
    _, captured = losses_and_predictions(model, batch)
    targets = torch.tensor([1, 2, 4, 5])  # items after the first of each row
    expected = cosine_contrastive_loss_reference(captured["pred"], bank.vectors, targets, captured["t"])
    assert float((with_bank.dense - base.dense).detach()) == pytest.approx(float(expected), abs=1e-4)
    assert with_bank.item_vectors.shape == (6, 16) and not with_bank.item_vectors.requires_grad
    with pytest.raises(ValueError):
        model(batch, keys[:3], ids[:3])  # a target without a bank row


def test_live_rows_keys_equal_whole_vectors_and_train_every_keys_row():
    """catalogue_live_rows: keys = the bank's text vectors + the items' current rows. With a fresh text bank the term
    equals that of a bank of whole vectors, and the rows of catalogue items outside the batch get a gradient (with a
    bank of whole vectors they get none)."""
    from cobra_scale.train.trainer import train_step

    torch.manual_seed(0)
    model = tiny_model(random_prefix=False, item_embedding=True, catalogue_items=12).eval()  # eval: no dropout, fresh = bank
    with torch.no_grad():
        model.item_emb.weight.normal_()
    tokens, mask, codes = catalogue()
    seq = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sub = torch.arange(6)  # items 6..11 are in the bank only
    batch = Batch(tokens[sub], mask[sub], codes[sub], sub, seq)
    with torch.no_grad():
        text = model.encode_items(tokens, mask)
        whole = model.encode_items(tokens, mask, torch.arange(12))
    keys, ids = VectorBank(text, -1).sample(sub)
    live = model(batch, model.with_item_rows(keys, ids), ids)
    stale = model(batch, whole, torch.arange(12))
    assert float(live.dense) == pytest.approx(float(stale.dense), abs=1e-5)
    assert torch.allclose(live.item_text, text[sub], atol=1e-6) and torch.allclose(live.item_vectors, whole[sub], atol=1e-6)
    live.total.backward()
    assert (model.item_emb.weight.grad[6:].abs().sum(1) > 0).all()
    model.zero_grad()
    model(batch, whole, torch.arange(12)).total.backward()
    assert (model.item_emb.weight.grad[6:] == 0).all()

    # one training step: the bank gets the batch's text vectors back (not the whole ones), and the rows outside the batch move
    bank = VectorBank(text, -1)
    before = model.item_emb.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = train_step(model, batch, opt, None, 0.0, bank=bank, live_rows=True)
    assert torch.equal(bank.vectors[sub], out.item_text.float())
    assert not torch.equal(model.item_emb.weight[6:], before[6:])


def test_same_id_candidates_hold_the_item_first_then_other_items_of_its_id():
    # IDs: items 0-2 share one ID, 3 is alone, 4-11 share another (8 items)
    codes = np.array([[0, 0]] * 3 + [[0, 1]] + [[1, 1]] * 8)
    buckets = id_groups(codes, 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        cand = same_id_candidates(buckets, np.array([0, 3, 5]), 3, rng)
        assert cand.shape == (3, 5) and cand[:, 0].tolist() == [0, 3, 5]
        assert sorted(x for x in cand[0, 1:] if x >= 0) == [1, 2]  # a small ID: every other item
        assert (cand[1, 1:] == -1).all()  # alone in its ID: no negative
        others = [x for x in cand[2, 1:] if x >= 0]  # a large ID: up to 4 distinct draws, never the item itself
        assert others and len(set(others)) == len(others) and set(others) <= set(range(4, 12)) - {5}
    held = np.zeros(12, dtype=bool)
    held[1] = True
    cand = same_id_candidates(id_groups(codes, 4, ~held), np.array([0]), 3, rng)
    assert sorted(x for x in cand[0, 1:] if x >= 0) == [2]  # held-out items are never drawn


def test_id_bank_term_is_the_softmax_inside_the_targets_id():
    """The term is the CE of each prediction over its target's candidates (bank vectors), column 0 positive;
    rows whose ID holds no other item are left out; the bank's keys get no gradient."""
    model = tiny_model(random_prefix=False)
    tokens, mask, codes = catalogue()
    seq = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sub = torch.arange(6)
    batch = Batch(tokens[sub], mask[sub], codes[sub], sub, seq)
    base, captured = losses_and_predictions(model, batch)
    bank = torch.randn(12, 16, requires_grad=True)
    cand = torch.full((6, 3), -1, dtype=torch.long)
    cand[:, 0] = sub
    cand[1, 1:] = torch.tensor([7, 9])  # target 1: two negatives
    cand[4, 1] = 11  # target 4: one negative; targets 2 and 5 have none
    out = model(batch, id_bank=(bank, cand))
    pred = F.normalize(captured["pred"], dim=-1)  # rows: targets 1, 2, 4, 5
    keys = F.normalize(bank.detach(), dim=-1)
    ce1 = -torch.log_softmax(torch.stack([pred[0] @ keys[1], pred[0] @ keys[7], pred[0] @ keys[9]]) / captured["t"], 0)[0]
    ce4 = -torch.log_softmax(torch.stack([pred[2] @ keys[4], pred[2] @ keys[11]]) / captured["t"], 0)[0]
    assert float((out.dense - base.dense).detach()) == pytest.approx(float((ce1 + ce4) / 2), abs=1e-4)
    out.total.backward()
    assert bank.grad is None or not bank.grad.abs().sum()


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
    with pytest.raises(ConfigError, match="id_bank_negatives"):
        TrainConfig(data="d", ids="i", out="o", id_bank_negatives=-1)
    with pytest.raises(ConfigError, match="catalogue_live_rows"):  # nothing to make live without the term or the rows
        TrainConfig(data="d", ids="i", out="o", catalogue_live_rows=True, model=CobraConfig(item_embedding=True))
    with pytest.raises(ConfigError, match="catalogue_live_rows"):
        TrainConfig(data="d", ids="i", out="o", catalogue_live_rows=True, catalogue_negatives=-1)
    with pytest.raises(ConfigError, match="catalogue_live_rows"):
        TrainConfig(data="d", ids="i", out="o", catalogue_live_rows=True, catalogue_negatives=-1, id_bank_negatives=4,
                    model=CobraConfig(item_embedding=True))
    with pytest.raises(ConfigError, match="local launcher"):
        TrainConfig(data="d", ids="i", out="o", id_bank_negatives=8, launcher="ray")
