"""The sharded IVF index keyed by sparse ID against the exact in-memory index."""

import pytest
import torch

from cobra_scale.errors import DataError
from cobra_scale.retrieve.exact import ExactIdIndex
from cobra_scale.retrieve.faiss_index import IdIvfIndex, pack_sids


def catalogue(n=997, d=24, n_ids=37, seed=0):
    """Random unit vectors; skewed bucket sizes (some IDs hold many items, some one)."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=g)
    sids = (torch.rand(n, generator=g) ** 2 * n_ids).long() * 7 + 3  # sparse, non-contiguous IDs
    return vectors, sids


def sorted_by_item(items, scores):
    """Rows as {item: score} (order-free comparison; ties may order differently)."""
    return [{int(i): float(s) for i, s in zip(r_i, r_s) if i >= 0} for r_i, r_s in zip(items.tolist(), scores.tolist())]


def assert_same_rows(a, b, atol=1e-5):
    ra, rb = sorted_by_item(*a), sorted_by_item(*b)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=atol)


@pytest.mark.parametrize("shards", [1, 3])
def test_search_in_ids_equals_exact(shards):
    vectors, sids = catalogue()
    exact = ExactIdIndex(vectors, sids)
    ivf = IdIvfIndex.build(vectors, sids, shards=shards)
    assert len(ivf) == len(vectors) and ivf.max_bucket == exact.max_bucket
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(50, vectors.shape[1], generator=g)
    qsids = sids[torch.randint(0, len(sids), (50,), generator=g)]
    qsids[::10] = 123456  # an ID without items: all padding
    items, cos = ivf.search_in_ids(queries, qsids)
    e_items, e_cos = exact.search_in_ids(queries, qsids)
    assert items.shape == e_items.shape
    assert_same_rows((items, cos), (e_items, e_cos))
    assert (items[::10] == -1).all() and torch.isinf(cos[::10]).all()
    # best first, and a cap on candidates per ID keeps the best ones
    assert (cos[:, :-1] >= cos[:, 1:]).all()
    top3, cos3 = ivf.search_in_ids(queries, qsids, k=3)
    torch.testing.assert_close(cos3, cos[:, :3])


@pytest.mark.parametrize("shards", [1, 4])
def test_search_all_items_with_exclusion_equals_exact(shards):
    vectors, sids = catalogue()
    exact = ExactIdIndex(vectors, sids)
    ivf = IdIvfIndex.build(vectors, sids, shards=shards)
    queries = torch.randn(9, vectors.shape[1], generator=torch.Generator().manual_seed(2))
    _, top = exact.search(queries, 5)
    exclude = torch.full((9, 4), -1, dtype=torch.long)
    exclude[:, 0] = exact.search(queries, 1)[0][:, 0]  # each query's best item
    exclude[:3, 1:3] = torch.tensor([5, 6])
    for ex in (None, exclude):
        got = ivf.search(queries, 20, ex)
        want = exact.search(queries, 20, ex)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
        assert_same_rows(got, want)
    assert not (ivf.search(queries, 20, exclude)[0] == exclude[:, :1]).any()


@pytest.mark.parametrize("shards", [1, 3])
def test_full_scan_by_matrix_product_equals_scanning_every_list(shards):
    """A flat shard on the CPU answers ``search`` from a copy of its vectors (matrix products): the same items and
    cosines as ``search_preassigned`` over every list, and as exact search."""
    import numpy as np

    vectors, sids = catalogue()
    ivf = IdIvfIndex.build(vectors, sids, shards=shards)
    queries = torch.randn(64, vectors.shape[1], generator=torch.Generator().manual_seed(3))
    got = ivf.search(queries, 50)
    assert all(sh.scan is not None for sh in ivf.shards)  # built on first use
    xq = torch.nn.functional.normalize(queries).numpy()
    n_lists = len(ivf.list_sids)
    for shard in ivf.shards:
        want_scores, want_items = shard.scan_lists(xq, 50, n_lists)
        scores, items = shard.full_scan(xq, 50, n_lists)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert_same_rows((torch.from_numpy(items), torch.from_numpy(scores)), (torch.from_numpy(want_items), torch.from_numpy(want_scores)))
    assert_same_rows(got, ExactIdIndex(vectors, sids).search(queries, 50))


def test_full_scan_sees_items_added_after_it_was_built():
    vectors, sids = catalogue(n=300, n_ids=10)
    ivf = IdIvfIndex.build(vectors, sids, shards=2)
    ivf.search(torch.randn(30, vectors.shape[1]), 5)  # builds each shard's scan copy
    new = torch.randn(25, vectors.shape[1], generator=torch.Generator().manual_seed(4)) * 10
    added = ivf.add(new, torch.cat([sids[:5], torch.arange(20) + 10_000]))
    items, cos = ivf.search(new, 1)
    assert items[:, 0].tolist() == added.tolist()  # each new item is its own nearest, found by the full scan
    torch.testing.assert_close(cos[:, 0], torch.ones(len(added)), atol=1e-5, rtol=0)


def test_shard_merge_equals_unsharded():
    vectors, sids = catalogue(n=600)
    one = IdIvfIndex.build(vectors, sids, shards=1)
    many = IdIvfIndex.build(vectors, sids, shards=5)
    assert [s.start for s in many.shards] == [0, 120, 240, 360, 480] and many.shards[-1].end == 600
    q = torch.randn(30, vectors.shape[1])
    qs = sids[:30]
    for k in (None, 4):
        a, b = one.search_in_ids(q, qs, k=k), many.search_in_ids(q, qs, k=k)
        torch.testing.assert_close(a[1], b[1])
        assert_same_rows(a, b)
    torch.testing.assert_close(one.search(q, 17)[1], many.search(q, 17)[1])
    assert torch.equal(one.bucket_items(qs), many.bucket_items(qs))
    assert torch.equal(many.bucket_items(qs), ExactIdIndex(vectors, sids).bucket_items(qs))


def test_save_load_round_trip(tmp_path):
    vectors, sids = catalogue(n=300)
    ivf = IdIvfIndex.build(vectors, sids, shards=2)
    ivf.save(tmp_path / "index", extra={"source": "test"})
    files = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert files == ["index.json", "lists.safetensors", "shard-00000.faiss", "shard-00000.json", "shard-00001.faiss", "shard-00001.json"]
    back = IdIvfIndex.load(tmp_path / "index")
    q = torch.randn(11, vectors.shape[1])
    for a, b in ((ivf.search_in_ids(q, sids[:11]), back.search_in_ids(q, sids[:11])), (ivf.search(q, 8), back.search(q, 8))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert back.max_bucket == ivf.max_bucket and back.meta["built_seconds"] == ivf.meta["built_seconds"]
    ivf.max_per_id = 2
    ivf.save(tmp_path / "capped")
    assert IdIvfIndex.load(tmp_path / "capped").search_in_ids(q, sids[:11])[0].shape == (11, 2)
    with pytest.raises(DataError, match="index.json"):
        IdIvfIndex.load(tmp_path)
    (tmp_path / "index" / "shard-00001.faiss").unlink()
    with pytest.raises(DataError, match="missing"):
        IdIvfIndex.load(tmp_path / "index")


def test_add_new_items_without_rebuild(tmp_path):
    vectors, sids = catalogue(n=200, n_ids=10)
    ivf = IdIvfIndex.build(vectors, sids, shards=2)
    nlist0 = ivf.nlist
    # an item in an existing ID, then many in new IDs (forces the lists to grow)
    new_vec = torch.randn(1 + 2 * nlist0, vectors.shape[1])
    new_sids = torch.cat([sids[:1], torch.arange(2 * nlist0) + 10_000])
    added = ivf.add(new_vec, new_sids)
    assert added.tolist() == list(range(200, 201 + 2 * nlist0)) and ivf.nlist > nlist0
    assert len(ivf) == 201 + 2 * nlist0 and ivf.shards[-1].end == 201 + 2 * nlist0
    items, cos = ivf.search_in_ids(new_vec, new_sids, k=1)
    assert items[:, 0].tolist() == added.tolist()  # each new item is its own best match
    torch.testing.assert_close(cos[:, 0], torch.ones(len(added)), atol=1e-5, rtol=0)
    # old items still there, same as an index built from scratch over everything
    full = IdIvfIndex.build(torch.cat([vectors, new_vec]), torch.cat([sids, new_sids]))
    q = torch.randn(7, vectors.shape[1])
    for s in (sids[:7], new_sids[:7]):
        assert_same_rows(ivf.search_in_ids(q, s), full.search_in_ids(q, s))
    ivf.save(tmp_path / "grown")
    assert torch.equal(IdIvfIndex.load(tmp_path / "grown").search(q, 9)[0], ivf.search(q, 9)[0])


def test_pq_lists_hold_the_ids_items():
    vectors, sids = catalogue(n=800, d=16)
    ivf = IdIvfIndex.build(vectors, sids, kind="pq", pq_m=4, pq_bits=6, shards=2)
    exact = ExactIdIndex(vectors, sids)
    q, qs = vectors[:40] + 0.05 * torch.randn(40, 16), sids[:40]
    items, cos = ivf.search_in_ids(q, qs)
    e_items, e_cos = exact.search_in_ids(q, qs)
    # same candidate sets (PQ changes the scores, not which items are in an ID)
    assert [set(r) - {-1} for r in items.tolist()] == [set(r) - {-1} for r in e_items.tolist()]
    assert (items[:, 0] == torch.arange(40)).float().mean() > 0.7  # the query's own item mostly ranks first
    with pytest.raises(DataError, match="divide"):
        IdIvfIndex.build(vectors, sids, kind="pq", pq_m=5)


def test_bad_input_is_a_data_error():
    vectors, sids = catalogue(n=50)
    with pytest.raises(DataError, match="kind"):
        IdIvfIndex.build(vectors, sids, kind="hnsw")
    with pytest.raises(DataError, match="sparse IDs"):
        IdIvfIndex.build(vectors, sids[:10])
    with pytest.raises(DataError, match="shards"):
        IdIvfIndex.build(vectors, sids, shards=0)
    ivf = IdIvfIndex.build(vectors, sids)
    with pytest.raises(DataError, match="dimension"):
        ivf.add(torch.randn(2, 5), sids[:2])


def test_pack_sids_matches_recommender_packing():
    codes = torch.tensor([[1, 2, 3], [0, 0, 1], [3, 3, 3]])
    assert pack_sids(codes, 4).tolist() == [1 * 16 + 2 * 4 + 3, 1, 63]


def test_gpu_request_without_gpu_falls_back_or_fails_clearly():
    import faiss

    vectors, sids = catalogue(n=50)
    ivf = IdIvfIndex.build(vectors, sids, device="auto")
    if faiss.get_num_gpus() == 0:
        assert ivf.device == "cpu"
        from cobra_scale.errors import CobraError

        with pytest.raises(CobraError, match="no GPU"):
            ivf.to_device("cuda")
    else:
        exact = ExactIdIndex(vectors, sids)
        q = torch.randn(5, vectors.shape[1])
        assert_same_rows(ivf.search_in_ids(q, sids[:5]), exact.search_in_ids(q, sids[:5]), atol=1e-4)


@pytest.mark.parametrize("shards", [1, 3])
def test_recommender_with_ivf_index_equals_exact(shards):
    """Every inference mode gives the same items and scores with either index."""
    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.model.config import CobraConfig
    from cobra_scale.retrieve.recommender import InferenceParams, Recommender

    torch.manual_seed(0)
    k_codes, n = 4, 60
    model = CobraModel(CobraConfig(levels=2, codes=k_codes, d_model=16, encoder_dim=16, decoder_heads=2, encoder_heads=2, vocab_size=50, text_tokens=6, max_items=8, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(5, 50, (n, 6), generator=g)
    codes = torch.stack([torch.arange(n) % k_codes, (torch.arange(n) // 7) % k_codes], 1)
    with torch.no_grad():
        vectors = model.encode_items(tokens, torch.ones_like(tokens))
    exact = Recommender(model, codes, vectors)
    ivf = Recommender(model, codes, vectors, index=IdIvfIndex.build(vectors, pack_sids(codes, k_codes), shards=shards))
    hist = torch.randint(0, n, (6, 5), generator=g)
    hist[:2, :2] = -1
    for mode in ("cobra", "no_fusion", "dense_only"):
        for masked in (False, True):
            p = InferenceParams(mode=mode, beams=6, psi=10.0, exclude_history=masked)
            a, b = exact.recommend(hist, 12, p), ivf.recommend(hist, 12, p)
            torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-4)
            assert_same_rows(a, b)
