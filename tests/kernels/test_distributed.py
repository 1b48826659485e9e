"""Cross-worker negatives with 2 gloo processes (loopback only) against one process on
the concatenated batch.

What is equal (W = 2 ranks, equal query counts, see cobra_kernels/distributed.py):
    mean_r loss_r                     == L (single-process loss on the concatenation)
    grad of rank r's queries / W      == dL/dq_r
    grad of rank r's keys / W         == dL/dk_r   (after the gather's reduce in backward)
    mean_r (temperature grad on r)    == dL/dtau
i.e. DDP's gradient averaging of these local gradients gives exactly dL/dtheta.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cobra_kernels.distributed import gather_keys_with_grad, global_cosine_contrastive_loss
from cobra_kernels.reference import cosine_contrastive_loss_reference

WORLD = 2
QUERIES_PER_RANK = 6
KEYS_PER_RANK = [5, 8]  # unequal on purpose: the gather pads
DIM = 7
NUM_ITEMS = 6  # items repeat within and across ranks


def _global_batch():
    gen = torch.Generator().manual_seed(1234)
    queries = torch.randn(WORLD * QUERIES_PER_RANK, DIM, generator=gen, dtype=torch.float64)
    keys = torch.randn(sum(KEYS_PER_RANK), DIM, generator=gen, dtype=torch.float64)
    key_ids = torch.randint(0, NUM_ITEMS, (sum(KEYS_PER_RANK),), generator=gen)
    # Each rank's queries have their positive among that rank's own keys.
    positives, start = [], 0
    for size in KEYS_PER_RANK:
        positives.append(torch.randint(start, start + size, (QUERIES_PER_RANK,), generator=gen))
        start += size
    positives = torch.cat(positives)
    return queries, keys, positives, key_ids[positives], key_ids


CASES = [("tiled", True), ("reference", False), ("tiled", False)]  # (impl, masked)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo binds loopback, never eth0
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    try:
        for impl, masked in CASES:
            _rank_case(rank, out_dir, impl, masked)
    finally:
        dist.destroy_process_group()


def _rank_case(rank: int, out_dir: str, impl: str, masked: bool) -> None:
    queries, keys, positives, query_ids, key_ids = _global_batch()
    rows = slice(rank * QUERIES_PER_RANK, (rank + 1) * QUERIES_PER_RANK)
    key_start = sum(KEYS_PER_RANK[:rank])
    cols = slice(key_start, key_start + KEYS_PER_RANK[rank])
    local_q = queries[rows].clone().requires_grad_()
    local_k = keys[cols].clone().requires_grad_()
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    local_positives = positives[rows] - key_start  # index into the local keys

    gathered = gather_keys_with_grad(local_k.detach(), key_ids[cols])
    assert gathered.offset == key_start
    assert torch.equal(gathered.keys, keys) and torch.equal(gathered.item_ids, key_ids)

    loss = global_cosine_contrastive_loss(
        local_q, local_k, local_positives, temperature,
        query_ids[rows] if masked else None, key_ids[cols] if masked else None, impl=impl, chunk_size=4,
    )  # fmt: skip
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "grad_q": local_q.grad, "grad_k": local_k.grad, "grad_t": temperature.grad},
        os.path.join(out_dir, f"{impl}-{masked}-rank{rank}.pt"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Runs every case once in one 2-process gloo group; returns the saved folder."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return out_dir


@pytest.mark.parametrize("impl, masked", CASES)
def test_two_gloo_ranks_equal_one_process_on_concatenated_batch(rank_results, impl, masked):
    results = [torch.load(rank_results / f"{impl}-{masked}-rank{r}.pt") for r in range(WORLD)]

    queries, keys, positives, query_ids, key_ids = _global_batch()
    queries.requires_grad_()
    keys.requires_grad_()
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    # The reference computes in fp32; the ranks computed in fp64 (tiled) or fp32 (reference).
    loss = cosine_contrastive_loss_reference(
        queries, keys, positives, temperature, query_ids if masked else None, key_ids if masked else None
    )
    grad_q, grad_k, grad_t = torch.autograd.grad(loss, [queries, keys, temperature])

    tol = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean().float(), loss, **tol)
    torch.testing.assert_close(torch.cat([r["grad_q"] for r in results]) / WORLD, grad_q, **tol)
    torch.testing.assert_close(torch.cat([r["grad_k"] for r in results]) / WORLD, grad_k, **tol)
    torch.testing.assert_close(torch.stack([r["grad_t"] for r in results]).mean(), grad_t, **tol)


def test_without_process_group_is_the_local_loss():
    queries, keys, positives, query_ids, key_ids = _global_batch()
    torch.testing.assert_close(
        global_cosine_contrastive_loss(queries, keys, positives, 0.3, query_ids, key_ids, impl="tiled"),
        cosine_contrastive_loss_reference(queries, keys, positives, 0.3, query_ids, key_ids).double(),
    )
