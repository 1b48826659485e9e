"""The transition prior (retrieve/prior.py) and its mixture with BeamFusion in the Recommender."""

import numpy as np
import pytest
import torch

from cobra_scale.errors import DataError
from cobra_scale.retrieve.prior import TransitionPrior, mix
from cobra_scale.retrieve.recommender import InferenceParams, Recommender
from tests.model.test_cobra import catalogue, tiny_model

SEQS = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([4, 1, 2]), np.array([5, 0])]


def test_prior_counts_by_hand_and_round_trips(tmp_path):
    prior = TransitionPrior.from_sequences(SEQS, items=6, window=2, context=2, decay=0.5)
    # last item 1 (weight 1), the one before 0 (weight 0.5); window 2:
    # from 1: 2 twice, 3 once; from 0: 1 twice (window 1), 2 once and 3 once (window 2)
    items, p = prior.top(torch.tensor([[-1, 0, 1]]), 10)
    raw = {2: 2 + 0.5, 3: 1 + 0.5, 1: 0.5 * 2}
    total = sum(raw.values())
    got = {int(i): float(v) for i, v in zip(items[0], p[0]) if i >= 0}
    assert got == pytest.approx({i: v / total for i, v in raw.items()})
    assert items[0, :3].tolist() == [2, 3, 1] and items[0, 3:].tolist() == [-1] * 7
    # a user whose last items have no successor gets no prior
    items, p = prior.top(torch.tensor([[-1, -1, 3]]), 4)
    assert items.tolist() == [[-1] * 4] and float(p.sum()) == 0
    back = TransitionPrior.load(prior.save(tmp_path / "prior"))
    assert back.spec == prior.spec and (back.matrix != prior.matrix).nnz == 0
    assert np.array_equal(back.popularity, prior.popularity)


def test_prior_breaks_ties_by_popularity_and_refuses_bad_input(tmp_path):
    prior = TransitionPrior.from_sequences([np.array([0, 1]), np.array([0, 2]), np.array([3, 2]), np.array([4, 2])], items=5, window=1, context=1)
    items, _ = prior.top(torch.tensor([[0]]), 2)
    assert items.tolist() == [[2, 1]]  # equal counts out of 0; item 2 is more popular
    with pytest.raises(DataError, match="outside the catalogue"):
        TransitionPrior.from_sequences([np.array([0, 7])], items=5)
    with pytest.raises(DataError, match="no transition prior"):
        TransitionPrior.load(tmp_path)
    folder = prior.save(tmp_path / "p")
    (folder / "prior.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        TransitionPrior.load(folder)


def test_mix_by_hand():
    cand = torch.tensor([[3, 5, -1]])
    fused = torch.tensor([[0.6, 0.4, float("-inf")]])
    p_items = torch.tensor([[5, 7, -1]])
    p = torch.tensor([[0.75, 0.25, 0.0]])
    items, scores = mix(cand, fused, p_items, p, 0.5)
    got = {int(i): float(s) for i, s in zip(items[0], scores[0]) if i >= 0}
    assert got == pytest.approx({3: 0.3, 5: 0.2 + 0.375, 7: 0.125})
    assert items[0].tolist().count(5) == 1  # each item once
    # weight 0 keeps BeamFusion's scores, weight 1 is the prior alone
    _, s0 = mix(cand, fused, p_items, p, 0.0)
    assert s0[0, :2].tolist() == pytest.approx([0.6, 0.4])


def test_mix_equals_a_dict_reference_on_random_lists():
    """Random candidate and prior lists (overlapping, padded, some candidates unscored) against the definition."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b, c, p_n = 3, int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        cand = torch.stack([torch.randperm(60, generator=g)[:c] for _ in range(b)])
        fused = torch.rand(b, c, generator=g)
        cand[torch.rand(b, c, generator=g) < 0.2] = -1
        fused[torch.rand(b, c, generator=g) < 0.2] = float("-inf")
        p_items = torch.stack([torch.randperm(60, generator=g)[:p_n] for _ in range(b)])
        p_items[torch.rand(b, p_n, generator=g) < 0.2] = -1
        p = torch.rand(b, p_n, generator=g)
        items, scores = mix(cand, fused, p_items, p, 0.3)
        for row in range(b):
            prior = {int(i): float(q) for i, q in zip(p_items[row], p[row]) if i >= 0}
            scored = {int(i): float(f) for i, f in zip(cand[row], fused[row]) if i >= 0 and f > float("-inf")}
            want = {i: 0.7 * max(f, 0.0) + 0.3 * prior.get(i, 0.0) for i, f in scored.items()}
            want.update({i: 0.3 * q for i, q in prior.items() if i not in scored})
            got = [(int(i), float(s)) for i, s in zip(items[row], scores[row]) if i >= 0]
            assert len(got) == len({i for i, _ in got})  # each item once
            assert dict(got) == pytest.approx(want)


def test_recommender_with_prior_weight_zero_is_cobra_and_one_follows_the_prior():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    seqs = [np.array([0, 7, 9]), np.array([1, 7, 9]), np.array([2, 7, 11]), np.array([3, 4])]
    prior = TransitionPrior.from_sequences(seqs, items=12)
    rec = Recommender(model, codes, vec, prior=prior)
    hist = torch.tensor([[-1, 2, 7], [5, 6, 3]])
    plain = rec.recommend(hist, 5, InferenceParams("cobra", 6))
    zero = rec.recommend(hist, 5, InferenceParams("cobra", 6, prior_weight=0.0))
    assert torch.equal(plain[0], zero[0])
    items, scores = rec.recommend(hist, 5, InferenceParams("cobra", 6, prior_weight=1.0))
    # the prior out of (2, 7): 7 -> 9 twice, 7 -> 11 once, 2 -> 7 (weight .3); out of (6, 3): 3 -> 4 (weight 1)
    assert items[0, :3].tolist() == [9, 11, 7] and items[1, 0].item() == 4
    # history masked: 7 leaves the ranking
    masked, _ = rec.recommend(hist, 5, InferenceParams("cobra", 6, exclude_history=True, prior_weight=1.0))
    assert 7 not in masked[0].tolist() and 2 not in masked[0].tolist()
    many = rec.recommend_many(hist, 5, [InferenceParams("cobra", 6), InferenceParams("cobra", 6, prior_weight=0.5)])
    one = rec.recommend(hist, 5, InferenceParams("cobra", 6, prior_weight=0.5))
    assert torch.equal(many[0][0], plain[0]) and torch.equal(many[1][0], one[0])


def test_recommender_refuses_a_prior_it_cannot_use():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[0, 1]])
    rec = Recommender(model, codes, vec)
    with pytest.raises(ValueError, match="cobra prior"):
        rec.recommend(hist, 3, InferenceParams("cobra", 4, prior_weight=0.5))
    rec = Recommender(model, codes, vec, prior=TransitionPrior.from_sequences(SEQS, items=12))
    with pytest.raises(ValueError, match="mode cobra"):
        rec.recommend(hist, 3, InferenceParams("no_fusion", 4, prior_weight=0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rec.recommend(hist, 3, InferenceParams("cobra", 4, prior_weight=1.5))
    with pytest.raises(ValueError, match="covers 6 items"):
        Recommender(model, codes, vec, prior=TransitionPrior.from_sequences(SEQS, items=6))
