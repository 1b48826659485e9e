"""Batch construction: same-ID hard negatives, length-bucketed epochs, length-grouped text encoding."""

import numpy as np
import pytest
import torch

from cobra_scale.model.text_encoder import ItemTextEncoder
from cobra_scale.train.data import Catalogue, add_dedup_level, collate, length_bucketed_batches, same_id_items


def catalogue(codes) -> Catalogue:
    codes = torch.tensor(codes, dtype=torch.long)
    n = len(codes)
    tokens = torch.arange(n)[:, None].repeat(1, 3) + 1
    return Catalogue(np.arange(n, dtype=np.int64) * 10, tokens, torch.ones_like(tokens), codes, 4)


# items 0-3 share ID (0,0); 4-5 share (1,2); 6 and 7 are alone
CODES = [[0, 0]] * 4 + [[1, 2]] * 2 + [[3, 3], [2, 1]]


def test_id_buckets_group_items_by_full_id():
    order, start, size = catalogue(CODES).id_buckets()
    assert size.tolist() == [4, 4, 4, 4, 2, 2, 1, 1]
    for i in range(8):
        bucket = order[start[i] : start[i] + size[i]]
        assert i in bucket and all(CODES[j] == CODES[i] for j in bucket)


def test_dedup_level_numbers_the_items_of_each_id_in_catalogue_order():
    got = add_dedup_level(np.array(CODES), 4)
    assert got[:, 2].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    assert len({tuple(r) for r in got.tolist()}) == len(CODES)


def test_dedup_level_takes_as_many_digits_as_the_largest_id_needs():
    # 11 items in one ID and 2 in another, 4 codes per level: ranks 0..10 need 2 base-4 digits
    codes = np.array([[1, 2]] * 11 + [[0, 3]] * 2)
    got = add_dedup_level(codes, 4)
    assert got.shape == (13, 4)
    rank = got[:, 2] * 4 + got[:, 3]
    assert rank[:11].tolist() == list(range(11)) and rank[11:].tolist() == [0, 1]
    assert len({tuple(r) for r in got.tolist()}) == 13 and got.max() < 4


def test_same_id_items_come_from_the_targets_ids_only():
    cat = catalogue(CODES)
    got = same_id_items(cat, np.array([0, 6]), 50, np.random.default_rng(0))
    assert set(got.tolist()) == {0, 1, 2, 3}  # item 6 is alone in its ID: no negative
    assert same_id_items(cat, np.array([6, 7]), 5, np.random.default_rng(0)).size == 0


def test_held_out_items_are_never_negatives():
    """A cold-start split's cold items never reach a training batch, not even as same-ID negatives."""
    cat = catalogue(CODES)
    cat.id_buckets()  # cached before hold_out: hold_out must reset the cache
    cat.hold_out(np.array([1, 2, 5]))
    order, start, size = cat.id_buckets()
    assert size[[0, 3, 4]].tolist() == [2, 2, 1]
    for seed in range(20):
        got = set(same_id_items(cat, np.array([0, 3, 4]), 50, np.random.default_rng(seed)).tolist())
        assert got == {0, 3}  # item 4's ID now holds only item 4
        batch = collate([np.array([6, 0]), np.array([7, 4, 3])], cat, same_id_negatives=8, rng=np.random.default_rng(seed))
        assert not set(batch.item_ids.tolist()) & {1, 2, 5}


def test_hold_out_comes_from_the_splits_cold_items(tmp_path):
    from cobra_scale.data.io import write_table
    from cobra_scale.train.streaming import catalogue_arrays, catalogue_from_arrays
    from cobra_scale.train.trainer import hold_out_cold_items
    import pyarrow as pa

    cat = catalogue(CODES)
    hold_out_cold_items(cat, tmp_path)  # no cold_items.parquet: nothing held out
    assert cat.held_out is None
    write_table(pa.table({"item_id": pa.array([10, 50, 999], pa.int64())}), tmp_path / "cold_items.parquet")
    hold_out_cold_items(cat, tmp_path)
    assert np.flatnonzero(cat.held_out).tolist() == [1, 5]  # 999 is not in the catalogue
    # the Ray launcher's broadcast carries the mask
    assert np.array_equal(catalogue_from_arrays(catalogue_arrays(cat)).held_out, cat.held_out)
    assert catalogue_from_arrays(catalogue_arrays(catalogue(CODES))).held_out is None


def test_collate_with_negatives_keeps_sequences_and_adds_only_keys():
    cat = catalogue(CODES)
    windows = [np.array([6, 0]), np.array([7, 4, 6])]
    plain = collate(windows, cat)
    hard = collate(windows, cat, same_id_negatives=8, rng=np.random.default_rng(1))
    # the sequences name the same catalogue items
    for b in (plain, hard):
        assert b.item_ids.unique().numel() == b.item_ids.numel()
    seq_items = lambda b: [[int(b.item_ids[j]) if j >= 0 else -1 for j in row] for row in b.seq.tolist()]  # noqa: E731
    assert seq_items(plain) == seq_items(hard) == [[-1, 6, 0], [7, 4, 6]]
    extra = set(hard.item_ids.tolist()) - set(plain.item_ids.tolist())
    # targets are 0, 4, 6: negatives come from the IDs of 0 (items 1-3) and 4 (item 5)
    assert extra and extra <= {1, 2, 3, 5}
    assert torch.equal(hard.item_codes, cat.codes[hard.item_ids])
    assert torch.equal(hard.item_tokens, cat.tokens[hard.item_ids])


def test_length_bucketed_batches_cover_every_window_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 22, size=1000)
    batches = length_bucketed_batches(lengths, 32, np.random.default_rng(3), pool_batches=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert max(len(b) for b in batches) == 32
    # within a batch lengths are close: the padding is far below random batching's
    pad = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)
    random_pad = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in np.array_split(rng.permutation(1000), 32))
    assert pad < 0.2 * random_pad
    # seeded: the same epoch gives the same batches (resume)
    again = length_bucketed_batches(lengths, 32, np.random.default_rng(3), pool_batches=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


@pytest.mark.parametrize("groups", [1, 4])
def test_length_grouped_encoding_equals_one_pass(groups):
    torch.manual_seed(0)
    enc = ItemTextEncoder(100, 16, 1, 2, 10, 8, dropout=0.0).eval()
    n = 1100
    lengths = torch.randint(1, 11, (n,))
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    tokens = torch.randint(1, 100, (n, 10)) * mask
    with torch.no_grad():
        ref = enc(tokens, mask, length_groups=1)
        got = enc(tokens, mask, length_groups=groups)
    assert torch.allclose(ref, got, atol=1e-5)
