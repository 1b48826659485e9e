"""ExactIdIndex.search_in_ids in bounded memory: the same candidates as brute force for IDs of any size."""

import pytest
import torch
import torch.nn.functional as F

from cobra_scale.errors import CobraError
from cobra_scale.retrieve.exact import ExactIdIndex


def skewed_catalogue(seed: int = 0):
    """300 items: one ID of 200 (a 'giant' bucket), one of 40, and 60 IDs of 1 item."""
    g = torch.Generator().manual_seed(seed)
    sids = torch.cat([torch.full((200,), 7), torch.full((40,), 3), torch.arange(100, 160)])
    return torch.randn(len(sids), 16, generator=g), sids[torch.randperm(len(sids), generator=g)]


def brute_force(vectors, sids, queries, qsids, width):
    v, q = F.normalize(vectors, dim=-1), F.normalize(queries, dim=-1)
    items = torch.full((len(qsids), width), -1)
    cos = torch.full((len(qsids), width), float("-inf"))
    for r, sid in enumerate(qsids.tolist()):
        members = (sids == sid).nonzero().view(-1)
        c = q[r] @ v[members].T
        top, idx = c.topk(min(width, len(members)))
        items[r, : len(top)], cos[r, : len(top)] = members[idx], top
    return items, cos


@pytest.mark.parametrize("gather_max, cells", [(512, 1 << 22), (16, 50), (1, 1)])  # all gathered; mixed and chunked; every ID large
@pytest.mark.parametrize("k", [None, 5, 1000])
def test_search_in_ids_matches_brute_force_for_any_id_sizes(gather_max, cells, k):
    vectors, sids = skewed_catalogue()
    index = ExactIdIndex(vectors, sids)
    index.GATHER_MAX, index.CELLS = gather_max, cells
    g = torch.Generator().manual_seed(1)
    qsids = torch.cat([torch.tensor([7, 3, 100, 999, 7]), sids[torch.randint(0, len(sids), (25,), generator=g)]])
    queries = torch.randn(len(qsids), 16, generator=g)
    items, cos = index.search_in_ids(queries, qsids, k=k)
    width = min(k or 200, 200)
    want_items, want_cos = brute_force(vectors, sids, queries, qsids, width)
    assert items.shape == (len(qsids), width)
    torch.testing.assert_close(cos, want_cos)  # best first, -inf padded
    assert torch.equal(items, want_items)
    assert (items[3] == -1).all()  # an ID without items


def test_max_per_id_caps_the_candidates_and_huge_outputs_are_refused():
    vectors, sids = skewed_catalogue()
    capped = ExactIdIndex(vectors, sids, max_per_id=4)
    items, cos = capped.search_in_ids(torch.randn(3, 16), torch.tensor([7, 3, 100]))
    assert items.shape == (3, 4) and (items[2, 1:] == -1).all()
    index = ExactIdIndex(vectors, sids)
    index.OUTPUT_CELLS = 400  # 3 queries x 200 candidates is refused, with advice
    with pytest.raises(CobraError, match="max_per_id"):
        index.search_in_ids(torch.randn(3, 16), torch.tensor([7, 3, 100]))
    with pytest.raises(ValueError, match="max_per_id"):
        ExactIdIndex(vectors, sids, max_per_id=-1)
