"""Beam search cost per user: the beams of a user sharing the history's KV cache vs a copy per beam.

    .venv/bin/python tools/bench_beam.py                       # d 128, 3 x 32 codes, 20 history items
    .venv/bin/python tools/bench_beam.py --beams 20 40 --users 128 --threads 1

A randomly initialised COBRA model (the cost does not depend on the weights) and random
histories; ``shared`` is :func:`cobra_scale.model.beam.beam_search` as it runs, ``copied``
the same search with the cache materialised per beam after the first level (what the
decoder did before session 6: ``KVCache.materialize``). Both return the same beams (checked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.model.beam import PrefixMasks, beam_search  # noqa: E402
from cobra_scale.model.cobra import CobraModel  # noqa: E402
from cobra_scale.model.config import CobraConfig  # noqa: E402
from cobra_scale.model.decoder import KVCache  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codes", type=int, default=32)
    p.add_argument("--ids", type=int, default=30000, help="distinct IDs in the catalogue")
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--beams", type=int, nargs="+", default=[20, 40])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CobraConfig(levels=args.levels, codes=args.codes, d_model=args.d_model, encoder_dim=args.d_model, max_items=args.history + 1, dropout=0.0)
    model = CobraModel(cfg).eval()
    rng = np.random.default_rng(0)
    catalogue = rng.integers(0, args.codes, size=(args.ids, args.levels))
    masks = PrefixMasks(catalogue, args.codes)
    codes = torch.from_numpy(catalogue[rng.integers(0, args.ids, size=(args.users, args.history))])
    vectors = torch.nn.functional.normalize(torch.randn(args.users, args.history, args.d_model), dim=-1)
    valid = torch.ones(args.users, args.history, dtype=torch.bool)
    rows = []
    original = KVCache.repeat_interleave
    for beams in args.beams:
        run = lambda: beam_search(model, codes, vectors, valid, masks, beams)  # noqa: E731
        shared_beams = run()
        shared = timed(run, args.repeats)
        KVCache.repeat_interleave = lambda self, n: original(self, n).materialize()  # the old per-beam copy
        try:
            copied_beams = run()
            copied = timed(run, args.repeats)
        finally:
            KVCache.repeat_interleave = original
        same = bool(torch.equal(shared_beams.codes, copied_beams.codes))
        rows.append({"beams": beams, "users": args.users, "threads": args.threads, "shared_ms_per_user": round(shared / args.users * 1000, 2),
                     "copied_ms_per_user": round(copied / args.users * 1000, 2), "speedup": round(copied / shared, 2), "same_beams": same})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
