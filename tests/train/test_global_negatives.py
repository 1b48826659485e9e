"""``distributed.global_negatives``: the model's dense loss under 2 gloo ranks (loopback) equals
one process training on the concatenated batch.

Each rank holds half of the windows; their items are disjoint, so the concatenated batch has
exactly the union of the ranks' items as in-batch keys. With equal prediction counts per rank,
the mean over ranks of each rank's loss is the single-process loss, and the mean of the ranks'
parameter gradients (what DeepSpeed's data parallelism applies) is its gradient. With the local
scope the ranks only see their own items and the loss is higher (fewer keys, same positives).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cobra_scale.model.cobra import Batch, CobraModel
from cobra_scale.model.config import CobraConfig

WORLD, ITEMS, TOKENS, CODES = 2, 16, 6, 4
WINDOWS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # rank 0: rows 0-1, rank 1: rows 2-3


def _model() -> CobraModel:
    torch.manual_seed(0)
    cfg = CobraConfig(levels=2, codes=CODES, d_model=16, encoder_dim=16, decoder_heads=2, encoder_heads=2, vocab_size=50,
                      text_tokens=TOKENS, max_items=8, dropout=0.0)  # fmt: skip
    return CobraModel(cfg).double()


def _batch(rows: list[list[int]]) -> Batch:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(5, 50, (ITEMS, TOKENS), generator=g)
    tokens[:, 0] = 1
    codes = torch.stack([torch.arange(ITEMS) % CODES, (torch.arange(ITEMS) // CODES) % CODES], 1)
    items = torch.tensor(sorted({i for row in rows for i in row}))
    index = {int(item): pos for pos, item in enumerate(items)}
    seq = torch.tensor([[index[i] for i in row] for row in rows])
    return Batch(tokens[items], torch.ones(len(items), TOKENS, dtype=torch.long), codes[items], items, seq)


def _loss_and_grads(model: CobraModel, batch: Batch) -> dict:
    model.zero_grad()
    out = model(batch)
    out.total.backward()
    return {"dense": out.dense.detach(), "sparse": out.sparse.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        batch = _batch(WINDOWS[2 * rank : 2 * rank + 2])
        for scope in ("global", "local"):
            model = _model()
            model.dense_loss_scope = scope
            torch.save(_loss_and_grads(model, batch), os.path.join(out_dir, f"{scope}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_negatives_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    whole = _loss_and_grads(_model(), _batch(WINDOWS))
    ranks = [torch.load(tmp_path / f"global-rank{r}.pt") for r in range(WORLD)]
    torch.testing.assert_close(sum(r["dense"] for r in ranks) / WORLD, whole["dense"])
    torch.testing.assert_close(sum(r["sparse"] for r in ranks) / WORLD, whole["sparse"])
    assert set(ranks[0]["grads"]) == set(whole["grads"])
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(sum(r["grads"][name] for r in ranks) / WORLD, grad, msg=name)

    local = [torch.load(tmp_path / f"local-rank{r}.pt") for r in range(WORLD)]
    assert sum(r["dense"] for r in local) / WORLD < whole["dense"] - 1e-3  # half the keys: an easier softmax


def test_global_scope_without_a_process_group_is_the_local_loss():
    batch = _batch(WINDOWS)
    model = _model()
    local = _loss_and_grads(model, batch)["dense"]
    model.dense_loss_scope = "global"
    torch.testing.assert_close(_loss_and_grads(model, batch)["dense"], local)
