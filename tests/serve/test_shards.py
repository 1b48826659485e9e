"""Fan-out over item-range shards returns what one exact index returns."""

import pytest
import torch

from cobra_scale.retrieve.exact import ExactIdIndex
from cobra_scale.serve.shards import IndexShard, LocalShard, ShardedIndex, packed_sids, shard_ranges


def make(n=203, d=8, ids=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, ids, (n,), generator=g)


def sharded(vectors, sids, num_shards, kind="exact"):
    shards = [IndexShard.build(vectors[lo:hi], sids[lo:hi], lo, hi, kind) for lo, hi in shard_ranges(len(vectors), num_shards)]
    return ShardedIndex([LocalShard(s) for s in shards])


def as_sets(items, cos):
    """Per query: {item: cosine} of the non-padding candidates."""
    return [{int(i): float(c) for i, c in zip(ri, rc) if i >= 0} for ri, rc in zip(items, cos)]


def assert_same_candidates(got, want):
    for g, w in zip(as_sets(*got), as_sets(*want)):
        assert g.keys() == w.keys()
        assert all(abs(g[i] - w[i]) < 1e-5 for i in g)


def test_shard_ranges_cover_the_catalogue():
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(5, 1) == [(0, 5)]
    with pytest.raises(ValueError):
        shard_ranges(3, 4)


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_search_in_ids_is_the_union_of_the_id_buckets(num_shards):
    vectors, sids = make()
    exact, index = ExactIdIndex(vectors, sids), sharded(vectors, sids, num_shards)
    q = torch.randn(17, 8)
    qs = torch.randint(0, 11, (17,))  # IDs 9, 10 exist nowhere: empty answers
    assert_same_candidates(index.search_in_ids(q, qs), exact.search_in_ids(q, qs))


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_search_merges_to_the_global_top_k(num_shards):
    vectors, sids = make()
    exact, index = ExactIdIndex(vectors, sids), sharded(vectors, sids, num_shards)
    q = torch.randn(6, 8)
    exclude = torch.tensor([[-1, 0, 5], [200, 100, -1], [-1, -1, -1], [7, 8, 9], [1, 2, 3], [202, 201, 150]])
    for k, ex in ((10, None), (25, exclude), (203, None)):
        got_items, got = index.search(q, k, ex)
        want_items, want = exact.search(q, k, ex)
        torch.testing.assert_close(got, want)
        finite = torch.isfinite(want)
        assert torch.equal(got_items[finite], want_items[finite])


def test_packed_sids_match_the_recommender_packing():
    codes = torch.tensor([[1, 2, 3], [0, 0, 1], [3, 3, 3]])
    assert packed_sids(codes, 4).tolist() == [1 * 16 + 2 * 4 + 3, 1, 63]


def test_faiss_shards_answer_like_exact_ones():
    pytest.importorskip("cobra_scale.retrieve.faiss_index")
    vectors, sids = make(n=150)
    exact, index = ExactIdIndex(vectors, sids), sharded(vectors, sids, 3, kind="faiss")
    q, qs = torch.randn(9, 8), torch.randint(0, 9, (9,))
    assert_same_candidates(index.search_in_ids(q, qs), exact.search_in_ids(q, qs))
    got_items, got = index.search(q, 12)
    want_items, want = exact.search(q, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_items, want_items)


@pytest.mark.parametrize("num_shards,kind", [(1, "exact"), (3, "exact"), (4, "faiss")])
def test_max_per_id_keeps_the_same_best_candidates_as_one_index(num_shards, kind):
    """Serve's shards honour max_per_id: each shard's best N of an ID, merged, are one index's best N."""
    if kind == "faiss":
        pytest.importorskip("cobra_scale.retrieve.faiss_index")
    vectors, sids = make(n=300, ids=4)  # ~75 items per ID, so a cap of 10 cuts
    exact = ExactIdIndex(vectors, sids, max_per_id=10)
    index = sharded(vectors, sids, num_shards, kind)
    index.max_per_id = 10
    q, qs = torch.randn(12, 8), torch.randint(0, 5, (12,))  # ID 4 exists nowhere: empty answers
    got, want = index.search_in_ids(q, qs), exact.search_in_ids(q, qs)
    assert got[0].shape[1] == 10
    assert_same_candidates(got, want)
    assert all(len(s) == 10 for s, sid in zip(as_sets(*got), qs) if sid < 4)
    # an explicit k wins over the cap, as ExactIdIndex's does
    assert_same_candidates(index.search_in_ids(q, qs, 3), exact.search_in_ids(q, qs, 3))
    index.max_per_id = 0
    assert_same_candidates(index.search_in_ids(q, qs), ExactIdIndex(vectors, sids).search_in_ids(q, qs))
    with pytest.raises(ValueError, match="max_per_id"):
        ShardedIndex([LocalShard(IndexShard.build(vectors, sids, 0, len(vectors)))], max_per_id=-1)
