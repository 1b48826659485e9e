"""COBRA model: shapes, causality, constrained beam search, BeamFusion, retrieval modes."""

import math

import pytest
import torch

from cobra_scale.model.beam import PrefixMasks, beam_fusion, beam_search, greedy_decode
from cobra_scale.model.cobra import Batch, CobraModel, code_cross_entropy
from cobra_scale.model.config import CobraConfig
from cobra_scale.retrieve.exact import ExactIdIndex
from cobra_scale.retrieve.recommender import InferenceParams, Recommender

L, K, D = 2, 4, 16


def tiny_model(random_prefix: bool = True, **kw) -> CobraModel:
    torch.manual_seed(0)
    cfg = CobraConfig(levels=L, codes=K, d_model=D, encoder_dim=D, decoder_heads=2, encoder_heads=2, vocab_size=50, text_tokens=6, max_items=8, dropout=0.0, **kw)
    model = CobraModel(cfg).eval()
    if random_prefix and model.prefix_emb is not None:  # zero-initialised in the model; random here so the tests exercise them
        for table in model.prefix_emb:
            torch.nn.init.normal_(table.weight, std=0.5)
    return model


def catalogue(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 50, (n, 6), generator=g)
    tokens[:, 0] = 1  # [CLS]
    mask = torch.ones(n, 6, dtype=torch.long)
    codes = torch.stack([torch.arange(n) % K, (torch.arange(n) // K) % K], 1)
    return tokens, mask, codes


def batch(seq):
    tokens, mask, codes = catalogue()
    uniq = torch.arange(12)
    return Batch(tokens, mask, codes, uniq, torch.tensor(seq))


def test_forward_shapes_and_losses():
    model = tiny_model(random_prefix=False)
    out = model(batch([[-1, -1, 0, 1, 2], [3, 4, 5, 6, 7]]))
    assert out.predictions == 2 + 4  # targets: items after the first real one
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    assert len(out.sparse_per_level) == L
    # initial sparse CE per level is about log K
    assert all(abs(v - math.log(K)) < 1.0 for v in out.sparse_per_level)


@pytest.mark.parametrize("flags", [{}, {"use_sparse": False}, {"use_dense": False}])
def test_no_position_sees_the_future(flags):
    model = tiny_model(**flags)
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    seq_a = torch.tensor([[0, 1, 2, 3, 4]])
    seq_b = torch.tensor([[0, 1, 2, 9, 10]])  # differs from item 3 on
    T = model.tokens_per_item

    def hidden(seq):
        valid = seq >= 0
        x = model.item_tokens(codes[seq], vec[seq], model.positions(valid)).reshape(1, -1, D)
        h, _ = model.decoder(x, valid[:, :, None].expand(1, 5, T).reshape(1, -1))
        return h

    ha, hb = hidden(seq_a), hidden(seq_b)
    cut = 3 * T  # tokens of items 0..2
    torch.testing.assert_close(ha[:, :cut], hb[:, :cut])
    assert not torch.allclose(ha[:, cut:], hb[:, cut:])


def test_left_padding_does_not_change_outputs():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    a = torch.tensor([[2, 3, 4]])
    b = torch.tensor([[-1, -1, 2, 3, 4]])
    ha, _, pa_ = model.start(codes[a.clamp(min=0)], vec[a.clamp(min=0)], a >= 0)
    hb, _, pb = model.start(codes[b.clamp(min=0)], vec[b.clamp(min=0)], b >= 0)
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
    assert int(pa_) == int(pb) == 3


def test_kv_cache_step_equals_full_recompute():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[0, 1, 2]])
    valid = hist >= 0
    _, cache, pos = model.start(codes[hist], vec[hist], valid)
    h_step, _ = model.step_code(cache, 0, codes[3:4, 0], pos)
    # full recompute: history + item 3's first code token, no cache
    x = model.item_tokens(codes[hist], vec[hist], model.positions(valid)).reshape(1, -1, D)
    x_new = model.code_emb[0](codes[3:4, 0]) + model.type_emb.weight[0] + model.pos_emb(pos) + model.prefix_emb[0](codes[3:4, 0])
    h_full, _ = model.decoder(torch.cat([x, x_new[:, None]], 1), torch.ones(1, x.shape[1] + 1, dtype=torch.bool))
    torch.testing.assert_close(h_step, h_full[:, -1], atol=1e-5, rtol=1e-5)


def test_shared_prefix_cache_equals_a_copied_prefix_per_beam():
    """Beams attend to their user's history through a shared prefix; same as copying it per beam."""
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[-1, -1, 0, 1], [2, 3, 4, 5], [-1, 6, 7, 8]])  # left padding differs per user
    valid = hist >= 0
    _, cache, pos = model.start(codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], valid)
    m = 3
    shared = cache.repeat_interleave(m)
    assert shared.shared is cache and shared.group == m and shared.keys[0].shape[2] == 0
    copied = shared.materialize()
    assert copied.shared is None and copied.keys[0].shape[0] == 3 * m
    step_codes, pos_beam = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0]), pos.repeat_interleave(m)
    h_shared, c_shared = model.step_code(shared, 0, step_codes, pos_beam)
    h_copied, c_copied = model.step_code(copied, 0, step_codes, pos_beam)
    torch.testing.assert_close(h_shared, h_copied, atol=1e-5, rtol=1e-5)
    # beams survive in a new order and number (4 per user): rows stay with their user
    rows = torch.tensor([2, 0, 0, 1, 5, 5, 3, 4, 8, 6, 7, 7])
    s2, c2 = c_shared.select(rows), c_copied.select(rows)
    assert s2.group == 4
    h_shared, _ = model.step_code(s2, 1, step_codes[rows], pos_beam[rows], step_codes[rows])
    h_copied, _ = model.step_code(c2, 1, step_codes[rows], pos_beam[rows], step_codes[rows])
    torch.testing.assert_close(h_shared, h_copied, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="evenly"):
        c_shared.select(rows[:7])


def test_prefix_embeddings_tell_codes_apart_by_prefix_and_hash_deep_tries():
    model = tiny_model()
    # the same level-1 code under two different level-0 codes gets different logits
    h = torch.randn(1, D).expand(2, D)
    a = model.code_logits(h, 1, torch.tensor([0, 1]))
    assert not torch.allclose(a[0], a[1])
    # without prefix embeddings the two are equal (the per-level head sees no prefix)
    plain = tiny_model(prefix_embeddings=False)
    b = plain.code_logits(h, 1, torch.tensor([0, 1]))
    torch.testing.assert_close(b[0], b[1])
    # a trie deeper than prefix_rows is hashed into the table
    small = tiny_model(prefix_rows=5)
    assert small.prefix_emb[1].num_embeddings == 5
    rows = small.prefix_rows(1, torch.arange(K * K))
    assert int(rows.min()) >= 0 and int(rows.max()) < 5


def test_beam_search_yields_valid_ids_and_m1_equals_greedy():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    # a sparse catalogue: only some ID combinations exist
    codes = codes[[0, 1, 5, 6, 10, 11]]
    vec = model.encode_items(tokens[:6], mask[:6])
    masks = PrefixMasks(codes.numpy(), K)
    existing = {tuple(c) for c in codes.tolist()}
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    valid = hist >= 0
    h_codes, h_vec = codes[hist.clamp(min=0)], vec[hist.clamp(min=0)]
    beams = beam_search(model, h_codes, h_vec, valid, masks, beams=10)
    # only as many finite beams as existing IDs; the rest are marked invalid (-inf)
    assert (torch.isfinite(beams.scores).sum(1) == len(existing)).all()
    for row in range(2):
        got = {tuple(c) for c, s in zip(beams.codes[row].tolist(), beams.scores[row].tolist()) if s > float("-inf")}
        assert got <= existing and len(got) == len(existing)
        assert torch.all(beams.scores[row][:-1] >= beams.scores[row][1:])  # sorted
    assert beams.dense.shape == (2, 10, D)
    one = beam_search(model, h_codes, h_vec, valid, masks, beams=1)
    assert torch.equal(one.codes[:, 0], greedy_decode(model, h_codes, h_vec, valid, masks))
    # a wider beam finds an ID at least as likely as the greedy one
    assert torch.all(beams.scores[:, 0] >= one.scores[:, 0] - 1e-6)


def test_constrained_codes_sparse_loss_is_the_ce_over_the_tries_children():
    """With constrained_codes the per-level CE is a softmax over the codes the trie allows after the prefix."""
    model = tiny_model(constrained_codes=True)
    tokens, mask, codes = catalogue()
    keep = [0, 1, 5, 6, 10, 11]  # a sparse trie: codes 0..3 at level 0, only some children each
    b = Batch(tokens[keep], mask[keep], codes[keep], torch.arange(6), torch.tensor([[0, 1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="code_masks"):
        model(b)
    masks = PrefixMasks(codes[keep].numpy(), K)
    model.code_masks = masks
    out = model(b)
    # by hand: the same hidden states, each level's logits restricted to the allowed codes
    free = tiny_model(constrained_codes=False)
    free.load_state_dict(model.state_dict())
    unconstrained = free(b)
    assert torch.isfinite(out.total)
    # level 0 allows every code present at level 0 (all of 0..3 here): the same CE
    assert out.sparse_per_level[0] == pytest.approx(unconstrained.sparse_per_level[0], abs=1e-6)
    # level 1 allows fewer codes than K: a strictly smaller CE (the disallowed codes held mass)
    assert out.sparse_per_level[1] < unconstrained.sparse_per_level[1]


def test_label_smoothing_by_hand_and_over_the_tries_children_only():
    logits = torch.tensor([[2.0, 0.0, float("-inf"), -1.0], [0.5, 0.5, 0.5, 0.5]])
    target = torch.tensor([0, 3])
    plain, nll = code_cross_entropy(logits, target, 0.0)
    assert plain is nll  # no smoothing: torch's CE itself
    loss, nll = code_cross_entropy(logits, target, 0.1)
    logp0 = torch.log_softmax(logits[0], -1)
    allowed0 = [0, 1, 3]  # code 2 is ruled out by the trie: not part of the uniform term, and the loss stays finite
    row0 = 0.9 * -logp0[0] + 0.1 * -logp0[allowed0].mean()
    row1 = -math.log(0.25)  # uniform logits: smoothing changes nothing
    assert float(loss) == pytest.approx(float((row0 + row1) / 2), rel=1e-6)
    assert float(nll) == pytest.approx(float((-logp0[0] + row1) / 2), rel=1e-6)
    # equals torch's label_smoothing where no code is ruled out
    free = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    assert float(code_cross_entropy(free, target[:1], 0.2)[0]) == pytest.approx(float(torch.nn.functional.cross_entropy(free, target[:1], label_smoothing=0.2)), rel=1e-6)


def test_label_smoothing_in_the_model_is_finite_and_logs_the_plain_ce():
    tokens, mask, codes = catalogue()
    keep = [0, 1, 5, 6, 10, 11]
    b = Batch(tokens[keep], mask[keep], codes[keep], torch.arange(6), torch.tensor([[0, 1, 2, 3, 4, 5]]))
    plain = tiny_model(constrained_codes=True)
    plain.code_masks = PrefixMasks(codes[keep].numpy(), K)
    smooth = tiny_model(constrained_codes=True, label_smoothing=0.2)
    smooth.load_state_dict(plain.state_dict())
    smooth.code_masks = plain.code_masks
    a, s = plain(b), smooth(b)
    assert torch.isfinite(s.total) and s.sparse_per_level == pytest.approx(a.sparse_per_level, abs=1e-6)
    assert s.sparse.item() != pytest.approx(a.sparse.item(), abs=1e-4)
    s.total.backward()
    with pytest.raises(Exception, match="label_smoothing"):
        CobraConfig(label_smoothing=1.0)


def test_constrained_codes_beam_scores_are_log_probs_over_the_catalogues_ids():
    model = tiny_model(constrained_codes=True)
    tokens, mask, codes = catalogue()
    keep = [0, 1, 5, 6, 10, 11]
    codes = codes[keep]
    vec = model.encode_items(tokens[:6], mask[:6])
    masks = PrefixMasks(codes.numpy(), K)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    h_codes, h_vec, valid = codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0
    beams = beam_search(model, h_codes, h_vec, valid, masks, beams=10)
    finite = torch.isfinite(beams.scores)
    assert (finite.sum(1) == len({tuple(c) for c in codes.tolist()})).all()
    # every existing ID is a beam: their probabilities sum to 1 (renormalised over the trie at each level)
    total = torch.where(finite, beams.scores.exp(), torch.zeros_like(beams.scores)).sum(1)
    assert torch.allclose(total, torch.ones(2), atol=1e-5)
    one = beam_search(model, h_codes, h_vec, valid, masks, beams=1)
    assert torch.equal(one.codes[:, 0], greedy_decode(model, h_codes, h_vec, valid, masks))
    # the same weights unconstrained leak mass to IDs that do not exist: their scores sum to less than 1
    free = tiny_model(constrained_codes=False)
    free.load_state_dict(model.state_dict())
    leak = beam_search(free, h_codes, h_vec, valid, masks, beams=10)
    assert (torch.where(torch.isfinite(leak.scores), leak.scores.exp(), torch.zeros_like(leak.scores)).sum(1) < 1 - 1e-3).all()


def test_sparse_prefix_masks_equal_the_dense_tables():
    import numpy as np

    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, size=(40, 4))
    dense = PrefixMasks(codes, K)
    sparse = PrefixMasks(codes, K, dense_rows=1)  # every level below the first by binary search
    assert sparse.allowed[2].dim() == 1
    for level in range(4):
        every = torch.arange(K**level)
        torch.testing.assert_close(sparse.mask(level, every), dense.mask(level, every))
    model = tiny_model(use_dense=False)
    hist, valid = torch.tensor(codes[None, :3, :L]), torch.ones(1, 3, dtype=torch.bool)
    beams_d = beam_search(model, hist, None, valid, PrefixMasks(codes[:, :L], K), 5, with_dense=False)
    beams_s = beam_search(model, hist, None, valid, PrefixMasks(codes[:, :L], K, dense_rows=1), 5, with_dense=False)
    assert torch.equal(beams_d.codes, beams_s.codes) and torch.equal(beams_d.scores, beams_s.scores)


def test_beam_fusion_hand_computed():
    beam_scores = torch.tensor([[math.log(0.6), math.log(0.3)]])
    cos = torch.tensor([[[0.9, 0.1], [0.5, float("-inf")]]])
    got = beam_fusion(beam_scores, cos, tau=1.0, psi=2.0, normalize="per_beam")
    pb = torch.tensor([0.6, 0.3]) / 0.9
    c0 = torch.softmax(torch.tensor([1.8, 0.2]), 0)
    expected = torch.tensor([[[pb[0] * c0[0], pb[0] * c0[1]], [pb[1] * 1.0, 0.0]]])
    torch.testing.assert_close(got, expected)
    glob = beam_fusion(beam_scores, cos, tau=1.0, psi=2.0, normalize="global")
    z = math.exp(1.8) + math.exp(0.2) + math.exp(1.0)
    torch.testing.assert_close(glob[0, 1, 0], pb[1] * math.exp(1.0) / z)
    # a repeat shift of -0.5 on the cosine of the lone candidate of beam 1 and of candidate 0 of beam 0:
    # their probabilities are multiplied by exp(psi * -0.5), the others keep theirs (no renormalisation)
    shift = torch.tensor([[[-0.5, 0.0], [-0.5, 0.0]]])
    got = beam_fusion(beam_scores, cos, tau=1.0, psi=2.0, normalize="per_beam", shift=shift)
    f = math.exp(-1.0)
    expected = torch.tensor([[[pb[0] * c0[0] * f, pb[0] * c0[1]], [pb[1] * f, 0.0]]])
    torch.testing.assert_close(got, expected)
    glob = beam_fusion(beam_scores, cos, tau=1.0, psi=2.0, normalize="global", shift=shift)
    torch.testing.assert_close(glob[0, 1, 0], pb[1] * math.exp(1.0) * f / z)


def test_exact_index_buckets_and_exclusion():
    vectors = torch.eye(4)
    sids = torch.tensor([7, 3, 7, 9])
    index = ExactIdIndex(vectors, sids)
    items = index.bucket_items(torch.tensor([7, 9, 5]))
    assert sorted(items[0].tolist()) == [0, 2]
    assert items[1].tolist() == [3, -1] and items[2].tolist() == [-1, -1]
    got, cos = index.search_in_ids(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([7]))
    assert dict(zip(got[0].tolist(), cos[0].tolist())) == {0: 0.0, 2: 1.0}
    top, _ = index.search(torch.tensor([[1.0, 0.9, 0.0, 0.0]]), 2, exclude=torch.tensor([[0, -1]]))
    assert top[0, 0].item() == 1


def test_recommender_modes_return_catalogue_items():
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    rec = Recommender(model, codes, vec)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    for mode in ("cobra", "no_fusion"):
        items, scores = rec.recommend(hist, 5, InferenceParams(mode=mode, beams=6))
        assert items.shape == (2, 5)
        valid = items[items >= 0]
        assert ((valid >= 0) & (valid < 12)).all()
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
    items, _ = rec.recommend(hist, 5, InferenceParams(beams=16, exclude_history=True))
    for row in range(2):
        assert not set(items[row].tolist()) & set(hist[row][hist[row] >= 0].tolist())


def test_recommend_many_equals_separate_calls():
    """A tau/psi grid shares one beam search; every setting's answer is what recommend() gives alone."""
    model = tiny_model()
    tokens, mask, codes = catalogue()
    rec = Recommender(model, codes, model.encode_items(tokens, mask))
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4], [-1, -1, 7]])
    settings = [InferenceParams(tau=t, psi=p, beams=b, exclude_history=x, normalize=n)
                for t in (0.5, 3.0) for p in (1.0, 20.0) for b in (4, 8) for x in (False, True) for n in ("global", "per_beam")]
    settings += [InferenceParams(mode="no_fusion", beams=4), InferenceParams(mode="liger", beams=4)]
    for params, (items, scores) in zip(settings, rec.recommend_many(hist, 6, settings)):
        alone_items, alone_scores = rec.recommend(hist, 6, params)
        assert torch.equal(items, alone_items), params
        torch.testing.assert_close(scores, alone_scores, rtol=0, atol=0)


def test_recommend_many_shares_the_sparse_only_beam_search():
    """w/o Dense: masked and unmasked settings share one beam search and equal separate calls."""
    model = tiny_model(use_dense=False)
    _, _, codes = catalogue()  # 12 items, each its own ID
    rec = Recommender(model, codes, None)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4], [-1, -1, 7]])
    settings = [InferenceParams(mode="sparse_only", beams=b, exclude_history=x) for b in (4, 8) for x in (False, True)]
    got = rec.recommend_many(hist, 4, settings)
    for params, (items, scores) in zip(settings, got):
        alone_items, alone_scores = rec.recommend(hist, 4, params)
        assert torch.equal(items, alone_items) and torch.equal(scores, alone_scores), params
    masked = got[1][0]
    assert not any(int(i) in hist[r].tolist() for r in range(3) for i in masked[r] if i >= 0)


def test_cold_start_item_is_retrievable_without_retraining():
    """An item added after training gets its vector from the encoder and its ID from its
    codes; if its vector equals the predicted one, BeamFusion ranks it first."""
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[0, 1, 2]])
    masks = PrefixMasks(codes.numpy(), K)
    beams = beam_search(model, codes[hist], vec[hist], hist >= 0, masks, beams=4)
    top_codes, predicted = beams.codes[0, 0], beams.dense[0, 0]
    # the new item: in the top beam's ID, with a vector equal to the prediction
    new_codes = torch.cat([codes, top_codes[None]])
    new_vecs = torch.cat([vec, predicted[None]])
    rec = Recommender(model, new_codes, new_vecs)
    items, _ = rec.recommend(hist, 3, InferenceParams(beams=4, psi=50.0))
    assert items[0, 0].item() == 12


def test_liger_mode_ranks_a_cold_item_equal_to_the_prediction_first():
    """LIGER: a cold-start item outside every beam's ID whose vector equals the top beam's
    predicted vector is ranked first; COBRA (BeamFusion) cannot reach it."""
    model = tiny_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[0, 1, 2]])
    beams = beam_search(model, codes[hist], vec[hist], hist >= 0, PrefixMasks(codes.numpy(), K), beams=2)
    k = K
    used = {int(beams.codes[0, m, 0]) * k + int(beams.codes[0, m, 1]) for m in range(2)}
    free = next((a, b) for a in range(k) for b in range(k) if a * k + b not in used)
    new_codes = torch.cat([codes, torch.tensor([free])])  # an ID no beam reaches
    new_vecs = torch.cat([vec, beams.dense[0, 0][None]])
    rec = Recommender(model, new_codes, new_vecs, cold_items=torch.tensor([12]))
    items, scores = rec.recommend(hist, 3, InferenceParams(mode="liger", beams=2))
    assert items[0, 0].item() == 12 and scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    cobra, _ = rec.recommend(hist, 3, InferenceParams(mode="cobra", beams=2))
    assert 12 not in cobra[0].tolist()
    # without cold items LIGER ranks only the beams' items, each once
    rec.cold_items = None
    items, _ = rec.recommend(hist, 5, InferenceParams(mode="liger", beams=2))
    got = [i for i in items[0].tolist() if i >= 0]
    assert 12 not in got and len(got) == len(set(got))


def test_repeat_bias_is_added_to_the_codes_that_extend_the_prefix_into_a_history_id():
    model = tiny_model(repeat_bias=True)
    with torch.no_grad():
        model.repeat.logit.copy_(torch.tensor([0.5, -2.0]))
    h = torch.randn(2, D)
    prefix = torch.tensor([1, 2])
    history = torch.tensor([[1 * K + 3, 2 * K + 0], [-1, 2 * K + 1]])  # packed level-1 nodes of each row's history
    want = model.code_logits(h, 1, prefix).clone()
    want[0, 3] -= 2.0  # row 0: prefix 1 + code 3 is a history ID; (2, 0) is not under prefix 1
    want[1, 1] -= 2.0
    torch.testing.assert_close(model.code_logits(h, 1, prefix, history), want)
    level0 = model.code_logits(h, 0, None, torch.tensor([[3, 3], [-1, 0]]))
    torch.testing.assert_close(level0 - model.code_logits(h, 0), torch.tensor([[0, 0, 0, 0.5], [0.5, 0, 0, 0]]))
    # the nodes come from the history codes, padding -1
    codes = torch.tensor([[[1, 3], [2, 0]]])
    assert model.history_nodes(codes, torch.tensor([[False, True]]), 1).tolist() == [[-1, 2 * K + 0]]


def test_repeat_bias_in_training_sees_only_earlier_items_and_learns():
    model = tiny_model(repeat_bias=True)
    plain = tiny_model(repeat_bias=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "repeat.logit"})
    no_repeat, repeat = [[1, 2, 3, 5]], [[1, 2, 3, 1]]  # the last target repeats the first item's ID
    # zero-initialised: the same losses as a model without it
    assert float(model(batch(no_repeat)).sparse.detach()) == pytest.approx(float(plain(batch(no_repeat)).sparse.detach()), abs=1e-6)
    with torch.no_grad():
        model.repeat.logit.copy_(torch.tensor([0.0, -50.0]))
    # no target repeats an earlier ID: the penalty only removes mass from other codes (the target and the
    # future are not counted as history, or the loss would jump by ~50 / predictions)
    assert float(model(batch(no_repeat)).sparse.detach()) <= float(plain(batch(no_repeat)).sparse.detach()) + 1e-6
    out = model(batch(repeat))
    assert out.sparse_per_level[1] > 50 / 3 - 1  # one of the three level-1 targets is a penalised history ID
    out.total.backward()
    assert model.repeat.logit.grad[1] < 0  # descending the gradient raises the penalised logit back


def repeat_beam_inputs(model):
    """The catalogue's codes and trie, two histories (one left-padded) and the model's inputs for them."""
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    return codes, PrefixMasks(codes.numpy(), K), hist, (codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0)


def test_beam_search_with_repeat_bias_avoids_history_ids_and_m1_equals_greedy():
    model = tiny_model(repeat_bias=True)
    codes, masks, hist, (h_codes, h_vec, valid) = repeat_beam_inputs(model)
    plain = tiny_model(repeat_bias=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "repeat.logit"})
    same = beam_search(model, h_codes, h_vec, valid, masks, beams=6)
    torch.testing.assert_close(same.scores, beam_search(plain, h_codes, h_vec, valid, masks, beams=6).scores)
    with torch.no_grad():
        model.repeat.logit.copy_(torch.tensor([0.0, -1e4]))
    beams = beam_search(model, h_codes, h_vec, valid, masks, beams=6)
    sids = codes[:, 0] * K + codes[:, 1]
    for row in range(2):
        seen = set(sids[hist[row][hist[row] >= 0]].tolist())
        assert not seen & set(beams.sids[row].tolist())
    one = beam_search(model, h_codes, h_vec, valid, masks, beams=1)
    assert torch.equal(one.codes[:, 0], greedy_decode(model, h_codes, h_vec, valid, masks))


def test_repeat_bias_needs_the_sparse_path():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="repeat_bias"):
        tiny_model(repeat_bias=True, use_sparse=False)


def test_repeat_bias_loads_from_its_development_name():
    model = tiny_model(repeat_bias=True)
    state = dict(model.state_dict())
    state["repeat_logit"] = torch.tensor([0.25, -1.5])
    del state["repeat.logit"]
    model.load_state_dict(state)
    assert model.repeat.logit.tolist() == [0.25, -1.5]


def test_repeat_positions_pick_the_offset_of_the_most_recent_matching_history_item():
    model = tiny_model(repeat_bias=True, repeat_positions=3)
    assert tuple(model.repeat.logit.shape) == (L, 3)
    with torch.no_grad():
        model.repeat.logit.copy_(torch.tensor([[0.0, 0.0, 0.0], [-4.0, -2.0, -1.0]]))
    h = torch.randn(1, D)
    prefix = torch.tensor([1])
    # history, oldest first: (1,3) four items back, (1,2) three back, (1,3) two back, (2,0) one back, (1,0) the last
    history = torch.tensor([[1 * K + 3, 1 * K + 2, 1 * K + 3, 2 * K + 0, 1 * K + 0]])
    recency = CobraModel.history_recency(torch.ones(1, 5, dtype=torch.bool))
    assert recency.tolist() == [[4, 3, 2, 1, 0]]
    want = model.code_logits(h, 1, prefix).clone()
    want[0, 0] -= 4.0  # (1,0) is the last item: bucket 0
    want[0, 3] -= 1.0  # (1,3) at best two back: the last bucket (2 and older)
    want[0, 2] -= 1.0  # (1,2) three back: the last bucket
    torch.testing.assert_close(model.code_logits(h, 1, prefix, history, recency), want)
    with pytest.raises(ValueError, match="recency"):
        model.code_logits(h, 1, prefix, history)


def test_repeat_positions_in_training_count_back_from_each_target():
    # sequence 1, 2, 3, 1: the last target repeats item 1, three items back from it (bucket 2 of 3)
    seq = [[1, 2, 3, 1]]
    losses = {}
    for name, offsets in {"recent": [0.0, -50.0, 0.0], "old": [0.0, 0.0, -50.0]}.items():
        model = tiny_model(repeat_bias=True, repeat_positions=3)
        with torch.no_grad():
            model.repeat.logit[1].copy_(torch.tensor(offsets))
        losses[name] = model(batch(seq)).sparse_per_level[1]
    plain = tiny_model(repeat_bias=True, repeat_positions=3)
    base = plain(batch(seq)).sparse_per_level[1]
    # penalising history items one back spares the repeat (it is three back); penalising old ones hits it
    assert losses["recent"] <= base + 1e-6
    assert losses["old"] > base + 50 / 3 - 1


def test_beam_search_with_repeat_positions_m1_equals_greedy_and_avoids_penalised_ids():
    model = tiny_model(repeat_bias=True, repeat_positions=2)
    codes, masks, hist, (h_codes, h_vec, valid) = repeat_beam_inputs(model)
    with torch.no_grad():
        model.repeat.logit.copy_(torch.tensor([[0.0, 0.0], [-1e4, 0.0]]))  # only the last history item's ID is penalised
    beams = beam_search(model, h_codes, h_vec, valid, masks, beams=6)
    sids = codes[:, 0] * K + codes[:, 1]
    for row in range(2):
        assert int(sids[hist[row, -1]]) not in set(beams.sids[row].tolist())
    one = beam_search(model, h_codes, h_vec, valid, masks, beams=1)
    assert torch.equal(one.codes[:, 0], greedy_decode(model, h_codes, h_vec, valid, masks))


def test_repeat_positions_needs_repeat_bias():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="repeat_positions"):
        tiny_model(repeat_positions=2)
    with pytest.raises(ConfigError, match="repeat_positions"):
        tiny_model(repeat_bias=True, repeat_positions=0)


# ---------------------------------------------------------------- dense_repeat_bias


def _captured_dense_inputs(model, b, monkeypatch, **kw):
    """Run the model on ``b`` and return (losses, the dense loss's first call's pred / keys / temperature)."""
    import cobra_scale.model.cobra as cobra_mod

    seen = {}
    original = cobra_mod.dense_contrastive_loss

    def spy(pred, keys, *args, **kwargs):
        seen.setdefault("pred", pred.detach())
        seen.setdefault("keys", keys.detach())
        seen.setdefault("t", args[1].detach())
        return original(pred, keys, *args, **kwargs)

    monkeypatch.setattr(cobra_mod, "dense_contrastive_loss", spy)
    return model(b, **kw), seen


def _brute_dense(pred, keys, key_row, seq, t, offsets):
    """Mean over predictions of the dense cross-entropy with the offsets added to the logits of the row's history
    keys (the most recent occurrence's recency bucket), written out with a full (P, N) logit matrix."""
    logits = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T / t
    losses, p = [], 0
    for row in seq:
        for i in range(1, len(row)):
            if row[i] < 0 or row[i - 1] < 0:
                continue
            bias = torch.zeros(keys.shape[0])
            for j in range(i):  # oldest first: a later occurrence overwrites
                if row[j] >= 0:
                    bias[key_row(row[j])] = offsets[min(i - 1 - j, len(offsets) - 1)]
            losses.append(torch.nn.functional.cross_entropy((logits[p] + bias)[None], torch.tensor([key_row(row[i])])))
            p += 1
    return torch.stack(losses).mean()


SEQ = [[1, 2, 1, 3, 2, 1], [-1, -1, 4, 4, 5, 4], [-1, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("positions, offsets", [(1, [-1.3]), (3, [-1.5, 0.7, 0.3])])
def test_dense_repeat_bias_equals_the_loss_with_the_offsets_on_the_history_keys(monkeypatch, positions, offsets):
    model = tiny_model(dense_repeat_bias=True, dense_repeat_positions=positions, random_prefix=False)
    with torch.no_grad():
        model.dense_repeat.logit.copy_(torch.tensor(offsets).view_as(model.dense_repeat.logit))
    out, seen = _captured_dense_inputs(model, batch(SEQ), monkeypatch)
    want = _brute_dense(seen["pred"], seen["keys"], lambda item: item, SEQ, seen["t"], offsets)
    torch.testing.assert_close(out.dense.detach(), want, atol=1e-5, rtol=1e-5)
    out.total.backward()
    assert model.dense_repeat.logit.grad is not None and bool((model.dense_repeat.logit.grad != 0).any())


def test_dense_repeat_bias_on_the_bank_term(monkeypatch):
    model = tiny_model(dense_repeat_bias=True, dense_repeat_positions=2, random_prefix=False)
    with torch.no_grad():
        model.dense_repeat.logit.copy_(torch.tensor([[-2.0, 0.5]]))
    bank_keys, bank_ids = torch.randn(14, D), torch.arange(14)  # the catalogue's 12 items and two more
    out, seen = _captured_dense_inputs(model, batch(SEQ), monkeypatch, bank_keys=bank_keys, bank_ids=bank_ids)
    in_batch = _brute_dense(seen["pred"], seen["keys"], lambda item: item, SEQ, seen["t"], [-2.0, 0.5])
    bank = _brute_dense(seen["pred"], bank_keys, lambda item: item, SEQ, seen["t"], [-2.0, 0.5])
    torch.testing.assert_close(out.dense.detach(), in_batch + bank, atol=1e-5, rtol=1e-5)


def test_dense_repeat_bias_at_zero_is_the_plain_model():
    model = tiny_model(dense_repeat_bias=True, random_prefix=False)
    plain = tiny_model(random_prefix=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "dense_repeat.logit"})
    torch.testing.assert_close(model(batch(SEQ)).dense, plain(batch(SEQ)).dense)


def test_dense_repeat_bias_config_is_checked():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="dense_repeat_bias"):
        tiny_model(dense_repeat_bias=True, use_dense=False)
    with pytest.raises(ConfigError, match="dense_repeat_positions"):
        tiny_model(dense_repeat_positions=2)


def test_history_item_offsets_take_the_most_recent_occurrence():
    model = tiny_model(dense_repeat_bias=True, dense_repeat_positions=3)
    with torch.no_grad():
        model.dense_repeat.logit.copy_(torch.tensor([[-4.0, -2.0, -1.0]]))
    history = torch.tensor([[-1, 5, 3, 5, 7]])  # 7 last, 5 one back (and three back), 3 two back
    cand = torch.tensor([[[7, 5, 3, 9, -1]]])
    t = float(model.temperature.detach())
    want = torch.tensor([[[-4.0 * t, -2.0 * t, -1.0 * t, 0.0, 0.0]]])
    torch.testing.assert_close(model.history_item_offsets(cand, history), want)
    assert tiny_model().history_item_offsets(cand, history) is None


@pytest.mark.parametrize("mode, normalize", [("cobra", "per_beam"), ("cobra", "global"), ("no_fusion", "per_beam")])
def test_recommender_applies_the_dense_repeat_bias(mode, normalize):
    """Offsets at zero: the plain model. Very negative: history items only after every other candidate, in
    per-beam BeamFusion too (the factor acts on the joint probability, so a history item alone in its ID falls)."""
    model = tiny_model(dense_repeat_bias=True)
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask).detach()
    rec = Recommender(model, codes, vec)
    hist = torch.tensor([[-1, 0, 1, 2], [3, 4, 5, 3]])
    params = InferenceParams(mode=mode, beams=6, normalize=normalize)
    plain = tiny_model()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "dense_repeat.logit"})
    items0, scores0 = rec.recommend(hist, 8, params)
    items_p, scores_p = Recommender(plain, codes, vec).recommend(hist, 8, params)
    assert torch.equal(items0, items_p)
    torch.testing.assert_close(scores0, scores_p)
    with torch.no_grad():
        model.dense_repeat.logit.fill_(-1e4)
    items, _ = rec.recommend(hist, 8, params)
    masked, _ = rec.recommend(hist, 8, InferenceParams(mode=mode, beams=6, normalize=normalize, exclude_history=True))
    for row in range(2):
        h = set(hist[row][hist[row] >= 0].tolist())
        ranked = [i for i in items[row].tolist() if i >= 0]
        others = [i for i in ranked if i not in h]
        assert ranked[: len(others)] == others  # history items, if any, last
        assert others == [i for i in masked[row].tolist() if i >= 0][: len(others)]
    with torch.no_grad():
        model.dense_repeat.logit.fill_(1e4)
    items, _ = rec.recommend(hist, 8, params)
    if mode == "no_fusion":  # every history item (once) comes first
        for row in range(2):
            h = set(hist[row][hist[row] >= 0].tolist())
            assert set(items[row, : len(h)].tolist()) == h


def test_history_dense_loss_is_added_to_the_total_and_sees_no_id_of_its_target():
    """model.history_dense_weight: a dense term from the position before the target's codes. Its value (total with
    the term minus total without) scales with the weight, and does not change when the target's codes change."""
    seq = [[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]]

    def extra(weight, codes_shift=0):
        model = tiny_model()
        tokens, mask, codes = catalogue()
        codes = codes.clone()
        codes[[3, 8]] = (codes[[3, 8]] + codes_shift) % K  # the last targets' codes (and only theirs)
        b = Batch(tokens, mask, codes, torch.arange(12), torch.tensor(seq))
        base = model(b).total
        model.cfg.history_dense_weight = weight
        with_term = model(b)
        return float((with_term.total - base).detach()), with_term

    one, out = extra(1.0)
    half, _ = extra(0.5)
    assert one > 0 and math.isclose(half, one / 2, rel_tol=1e-4)
    assert math.isclose(extra(1.0, codes_shift=1)[0], one, rel_tol=1e-4)  # the term reads no code of its target
    assert torch.isfinite(out.dense) and float(out.total) > float(out.sparse + out.dense)


@pytest.mark.parametrize("flags", [{"use_sparse": False}, {"use_dense": False}, {}])
def test_history_dense_weight_settings(flags):
    from cobra_scale.errors import ConfigError

    if not flags:
        with pytest.raises(ConfigError, match="history_dense_weight must be >= 0"):
            CobraConfig(history_dense_weight=-1)
        return
    with pytest.raises(ConfigError, match="history_dense_weight"):
        CobraConfig(history_dense_weight=1.0, **flags)


def successor_model(seed: int = 1) -> CobraModel:
    """tiny_model with model.successor_embedding, its rows random (zero-initialised in the model)."""
    model = tiny_model(successor_embedding=True, catalogue_items=12)
    torch.nn.init.normal_(model.succ_emb.weight, std=1.0, generator=torch.Generator().manual_seed(seed))
    return model


def test_successor_rows_at_zero_are_the_plain_model():
    plain = tiny_model()
    succ = tiny_model(successor_embedding=True, catalogue_items=12)
    missing, unexpected = succ.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["succ_emb.weight"] and not unexpected
    assert not succ.succ_emb.weight.any()  # zero-initialised
    b = batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    torch.testing.assert_close(succ(b).total, plain(b).total)
    tokens, mask, codes = catalogue()
    vec = plain.encode_items(tokens, mask)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    masks = PrefixMasks(codes.numpy(), K)
    args = (codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0, masks, 6)
    a, s = beam_search(plain, *args), beam_search(succ, *args, last_items=hist[:, -1])
    assert torch.equal(a.sids, s.sids)
    torch.testing.assert_close(a.scores, s.scores)


def test_successor_rows_train_only_on_items_followed_by_a_target():
    model = successor_model().train()
    model(batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])).total.backward()
    touched = model.succ_emb.weight.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 7]  # not the last items 3, 8, nor 9..11


def test_training_and_inference_add_the_same_successor_row():
    """The teacher-forced code CE of a one-target sequence (a, b) equals -log P(code of b) from inference's start."""
    model = successor_model()
    tokens, mask, codes = catalogue()
    a, b = 5, 9
    with torch.no_grad():
        out = model(batch([[a, b]]))
        vec = model.encode_items(tokens, mask, torch.arange(12))
        first = torch.tensor([[a]])
        h, _, _ = model.start(codes[first], vec[first], torch.ones(1, 1, dtype=torch.bool))
        with_row = model.code_logprobs(h + model.successor_shift(torch.tensor([a])), 0)[0, codes[b, 0]]
        without = model.code_logprobs(h, 0)[0, codes[b, 0]]
    assert math.isclose(out.sparse_per_level[0], -float(with_row), rel_tol=1e-5)
    assert not math.isclose(out.sparse_per_level[0], -float(without), rel_tol=1e-3)


def test_beam_search_with_successor_rows_m1_equals_greedy_and_reads_the_last_item():
    model = successor_model()
    tokens, mask, codes = catalogue()
    vec = model.encode_items(tokens, mask, torch.arange(12))
    masks = PrefixMasks(codes.numpy(), K)
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4], [-1, -1, -1]])
    args = (codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0, masks)
    one = beam_search(model, *args, beams=1, last_items=hist[:, -1])
    assert torch.equal(one.codes[:, 0], greedy_decode(model, *args, last_items=hist[:, -1]))
    with pytest.raises(ValueError, match="last_items"):
        beam_search(model, *args, beams=4)
    # another last item changes that user's beams only; -1 and an item beyond the table add nothing
    base = beam_search(model, *args, beams=6, last_items=hist[:, -1])
    moved = beam_search(model, *args, beams=6, last_items=torch.tensor([1, 7, -1]))
    assert not torch.allclose(base.scores[1], moved.scores[1])
    torch.testing.assert_close(base.scores[[0, 2]], moved.scores[[0, 2]])
    beyond = beam_search(model, *args, beams=6, last_items=torch.tensor([1, 4, 40]))
    torch.testing.assert_close(beyond.scores[2], base.scores[2])


def test_recommender_passes_each_users_last_item():
    model = successor_model()
    tokens, mask, codes = catalogue()
    rec = Recommender(model, codes, model.encode_items(tokens, mask, torch.arange(12)).detach())
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    settings = [InferenceParams(mode="cobra", beams=6), InferenceParams(mode="no_fusion", beams=6)]
    many = rec.recommend_many(hist, 5, settings)
    for p, (items, scores) in zip(settings, many):
        one_items, one_scores = rec.recommend(hist, 5, p)
        assert torch.equal(items, one_items)
        torch.testing.assert_close(scores, one_scores)
    before = rec.recommend(hist, 5, settings[0])[1]
    with torch.no_grad():
        model.succ_emb.weight[4] += 3.0  # user 1's last item
    after = rec.recommend(hist, 5, settings[0])[1]
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_successor_embedding_without_a_dense_path_and_config_checks():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="successor_embedding needs catalogue_items"):
        tiny_model(successor_embedding=True)
    noid = tiny_model(successor_embedding=True, catalogue_items=12, use_sparse=False)
    torch.nn.init.normal_(noid.succ_emb.weight, generator=torch.Generator().manual_seed(0))
    tokens, mask, codes = catalogue()
    rec = Recommender(noid, codes, noid.encode_items(tokens, mask, torch.arange(12)).detach())
    hist = torch.tensor([[-1, 0, 1], [2, 3, 4]])
    items, _ = rec.recommend(hist, 5, InferenceParams(mode="dense_only"))
    h, _, _ = noid.start(None, noid.encode_items(tokens, mask, torch.arange(12))[hist.clamp(min=0)], hist >= 0)
    q = noid.dense_prediction(h + noid.successor_shift(hist[:, -1]))
    want, _ = rec._search(q, 5, None, hist)
    assert torch.equal(items, want)


def context_model(k: int = 3) -> CobraModel:
    """successor_model with model.successor_context=k, its recency weights away from their start."""
    model = tiny_model(successor_embedding=True, successor_context=k, catalogue_items=12)
    torch.nn.init.normal_(model.succ_emb.weight, std=1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.succ_mix.copy_(torch.tensor([1.0, 0.5, -0.7])[:k])
    return model


def test_successor_context_training_adds_the_rows_inference_adds():
    """Teacher-forced code CE over the targets of (a, b, c, d) equals the mean of -log P(code) from inference's start
    on each prefix, whose shift weighs the rows of the last three items."""
    model = context_model(3)
    tokens, mask, codes = catalogue()
    seq = [5, 9, 2, 7]
    with torch.no_grad():
        out = model(batch([[-1] + seq]))
        vec = model.encode_items(tokens, mask, torch.arange(12))
        nll, nll_last_only = [], []
        for t in range(1, len(seq)):
            prefix = torch.tensor([seq[:t]])
            h, _, _ = model.start(codes[prefix], vec[prefix], torch.ones_like(prefix, dtype=torch.bool))
            nll.append(-float(model.code_logprobs(h + model.successor_shift(prefix), 0)[0, codes[seq[t], 0]]))
            nll_last_only.append(-float(model.code_logprobs(h + model.succ_emb.weight[seq[t - 1]], 0)[0, codes[seq[t], 0]]))
    assert math.isclose(out.sparse_per_level[0], sum(nll) / len(nll), rel_tol=1e-5)
    assert not math.isclose(out.sparse_per_level[0], sum(nll_last_only) / len(nll_last_only), rel_tol=1e-3)


def test_successor_context_weights_rows_by_recency_and_pads_short_histories():
    model = context_model(3)
    rows, w = model.succ_emb.weight, model.succ_mix
    hist = torch.tensor([[0, 1, 2, 3], [-1, -1, 4, 5], [-1, -1, -1, 6], [-1, -1, -1, -1]])
    want = torch.stack([w[0] * rows[3] + w[1] * rows[2] + w[2] * rows[1], w[0] * rows[5] + w[1] * rows[4], w[0] * rows[6], torch.zeros_like(rows[0])])
    torch.testing.assert_close(model.successor_shift(hist), want)
    torch.testing.assert_close(model.successor_shift(hist[:, -1]), w[0] * torch.stack([rows[3], rows[5], rows[6], torch.zeros_like(rows[0])]))
    torch.testing.assert_close(model.successor_shift(torch.tensor([[2, 40]])), w[1] * rows[2][None])  # beyond the table: nothing
    # with the older weights at zero it is the one-item model
    one = tiny_model(successor_embedding=True, catalogue_items=12)
    one.load_state_dict({k: v for k, v in model.state_dict().items() if k != "succ_mix"})
    with torch.no_grad():
        model.succ_mix.copy_(torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(model.successor_shift(hist), one.successor_shift(hist[:, -1]))
    torch.testing.assert_close(model(batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])).total, one(batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])).total)


def test_successor_context_weights_are_learned_and_checked():
    from cobra_scale.errors import ConfigError

    model = context_model(3).train()
    model(batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])).total.backward()
    assert model.succ_mix.grad is not None and bool((model.succ_mix.grad != 0).all())
    assert tiny_model(successor_embedding=True, catalogue_items=12).succ_mix is None  # context 1: no extra parameter
    with pytest.raises(ConfigError, match="successor_context must be >= 1"):
        tiny_model(successor_embedding=True, successor_context=0, catalogue_items=12)
    with pytest.raises(ConfigError, match="needs model.successor_embedding"):
        tiny_model(successor_context=3)


def test_recommender_reads_the_last_items_of_each_history_with_successor_context():
    model = context_model(3)
    tokens, mask, codes = catalogue()
    rec = Recommender(model, codes, model.encode_items(tokens, mask, torch.arange(12)).detach())
    hist = torch.tensor([[-1, 0, 1, 2], [3, 4, 5, 6]])
    p = InferenceParams(mode="cobra", beams=6)
    before = rec.recommend(hist, 5, p)[1]
    with torch.no_grad():
        model.succ_emb.weight[4] += 3.0  # user 1's third-last item (user 0 does not have it)
    after = rec.recommend(hist, 5, p)[1]
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    vec = model.encode_items(tokens, mask, torch.arange(12)).detach()
    args = (codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0, PrefixMasks(codes.numpy(), K))
    assert torch.equal(beam_search(model, *args, beams=1, last_items=hist).codes[:, 0], greedy_decode(model, *args, last_items=hist))


def dense_context_pair() -> tuple[CobraModel, CobraModel]:
    """context_model(3) twice, the same weights: the dense head of the first reads the last item's row alone."""
    three = context_model(3)
    with torch.no_grad():
        three.succ_emb.weight.mul_(10.0)  # large rows, so that which ones the dense head reads shows in its loss
    split = tiny_model(successor_embedding=True, successor_context=3, successor_context_dense=1, catalogue_items=12)
    split.load_state_dict(three.state_dict())
    return split, three


def test_successor_context_dense_feeds_the_dense_head_fewer_items_in_training():
    from cobra_scale.errors import ConfigError

    split, three = dense_context_pair()
    rows = batch([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]])

    def run(model):  # the losses and the hidden states the dense head reads
        seen = []
        hook = model.dense_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        with torch.no_grad():
            out = model(rows)
        hook.remove()
        return out, seen[0]

    (a, a_in), (b, b_in) = run(split), run(three)
    # the code heads are the same model's
    assert a.sparse_per_level == pytest.approx(b.sparse_per_level, rel=1e-6)
    assert not torch.allclose(a_in, b_in)
    # the dense head reads what the model whose older weights are zero reads
    with torch.no_grad():
        three.succ_mix[1:] = 0.0
    c, c_in = run(three)
    torch.testing.assert_close(a_in, c_in)
    assert math.isclose(float(a.dense), float(c.dense), rel_tol=1e-6)
    assert c.sparse_per_level != pytest.approx(a.sparse_per_level, rel=1e-3)
    with pytest.raises(ConfigError, match="successor_context_dense must be between"):
        tiny_model(successor_embedding=True, successor_context=2, successor_context_dense=3, catalogue_items=12)
    # without a dense head (w/o Dense) the option changes nothing: every code level reads the full context
    no_dense = {"successor_embedding": True, "successor_context": 3, "catalogue_items": 12, "use_dense": False}
    a, b = tiny_model(successor_context_dense=1, **no_dense), tiny_model(**no_dense)
    for model in (a, b):
        model.load_state_dict(split.state_dict(), strict=False)
    with torch.no_grad():
        assert a(rows).sparse_per_level == pytest.approx(b(rows).sparse_per_level, rel=1e-6)


def test_successor_context_dense_in_beam_search_and_the_dense_only_path():
    """An older item's row moves the beams' code scores, not the vector each beam's ID gets; dense_only reads the
    last item alone."""
    split, three = dense_context_pair()
    tokens, mask, codes = catalogue()
    vec = split.encode_items(tokens, mask, torch.arange(12)).detach()
    hist = torch.tensor([[-1, 0, 1, 2], [3, 4, 5, 6]])
    masks = PrefixMasks(codes.numpy(), K)
    args = (codes[hist.clamp(min=0)], vec[hist.clamp(min=0)], hist >= 0, masks)

    def by_id(model):  # every ID of the catalogue is a beam: sid -> (score, vector) per user
        out = beam_search(model, *args, beams=16, last_items=hist)
        return [{int(s): (float(out.scores[u, j]), out.dense[u, j]) for j, s in enumerate(out.sids[u]) if torch.isfinite(out.scores[u, j])} for u in range(2)]

    before, before3 = by_id(split), by_id(three)
    assert all(before[u][s][0] == pytest.approx(before3[u][s][0], abs=1e-5) for u in range(2) for s in before[u])
    with torch.no_grad():
        for model in (split, three):
            model.succ_emb.weight[[1, 5]] += 2.0  # user 0's and user 1's second-last items
    after, after3 = by_id(split), by_id(three)
    for u in range(2):
        assert len(after[u]) == len(before[u]) == 12
        assert any(abs(after[u][s][0] - before[u][s][0]) > 1e-4 for s in before[u])
        for s in before[u]:
            torch.testing.assert_close(after[u][s][1], before[u][s][1])
        assert any(not torch.allclose(after3[u][s][1], before3[u][s][1]) for s in before3[u])
    rec = Recommender(split, codes, vec)
    dense_only = rec.recommend(hist, 5, InferenceParams(mode="dense_only"))[1]
    with torch.no_grad():
        split.succ_emb.weight[[1, 5]] -= 4.0
        assert torch.allclose(rec.recommend(hist, 5, InferenceParams(mode="dense_only"))[1], dense_only)
        split.succ_emb.weight[[2, 6]] += 2.0  # the last items
        assert not torch.allclose(rec.recommend(hist, 5, InferenceParams(mode="dense_only"))[1], dense_only)
