"""What batching buys the recommender itself: B requests in one ``Recommender.recommend`` call against B calls of one.

    .venv/bin/python tools/bench_batching.py                          # Beauty-sized: 12,101 items, 3 x 32 codes, 50 beams
    .venv/bin/python tools/bench_batching.py --items 1000000 --batches 1 16 64 --device cuda

This is the model step that the Serve app's ``@serve.batch`` stacks (``cobra_scale/serve/engine.py``): beam search,
each beam's dense vector, the search inside its ID and BeamFusion, on the device ``--device`` picks (``auto``: CUDA
when present). A randomly initialised model and catalogue (the cost does not depend on the weights) and random
histories, so it needs no run and no Ray, faiss or data: it runs as is on a bare GPU machine (``tools/gpu_check.sh``).
It is not the Serve load test (``tools/load_test.py``, which adds HTTP, the proxy, the ingress and the shard fan-out):
a ratio here bounds what ``@serve.batch`` can give there. Prints one JSON line per batch size; ``same_as_single`` checks that a batch
answers each request as it is answered alone (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.devices import pick_device  # noqa: E402
from cobra_scale.errors import ConfigError  # noqa: E402
from cobra_scale.model.cobra import CobraModel  # noqa: E402
from cobra_scale.model.config import CobraConfig  # noqa: E402
from cobra_scale.retrieve.recommender import InferenceParams, Recommender  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(argv: list[str] | None = None) -> list[dict]:
    """The rows that :func:`main` prints."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codes", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--beams", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=128, help="requests timed per batch size (rounded up to whole batches)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    for name in ("items", "levels", "codes", "d_model", "history", "beams", "k", "requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batches):
        p.error("--batches must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dev = torch.device(pick_device(args.device))
    except ConfigError as exc:  # --device cuda without a GPU
        p.error(str(exc))
    torch.manual_seed(0)
    cfg = CobraConfig(levels=args.levels, codes=args.codes, d_model=args.d_model, encoder_dim=args.d_model,
                      max_items=args.history + 1, dropout=0.0)
    model = CobraModel(cfg).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, args.codes, (args.items, args.levels), generator=g)
    vectors = F.normalize(torch.randn(args.items, args.d_model, generator=g), dim=-1)
    rec = Recommender(model, codes.to(dev), vectors.to(dev))
    params = InferenceParams("cobra", args.beams)
    biggest = max(args.batches)
    n = -(-args.requests // biggest) * biggest  # the same requests for every batch size
    history = torch.randint(0, args.items, (n, args.history), generator=g)
    single = [rec.recommend(history[i : i + 1], args.k, params)[0] for i in range(biggest)]  # each request alone
    rows, base = [], None
    for b in args.batches:
        together = rec.recommend(history[:b], args.k, params)[0]  # also the warm-up (CUDA context, kernels, allocator)
        same = all(torch.equal(together[i], single[i][0]) for i in range(b))  # batching changes nothing but the cost
        _sync(dev)
        lat = []
        start = time.perf_counter()
        for lo in range(0, n, b):
            t = time.perf_counter()
            rec.recommend(history[lo : lo + b], args.k, params)
            _sync(dev)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        rps = n / wall
        base = base or rps
        lat_ms = sorted(x * 1000 for x in lat)
        rows.append({"device": str(dev), "items": args.items, "beams": args.beams, "batch": b, "requests": n,
                     "requests_per_s": round(rps, 1), "vs_batch_1": round(rps / base, 2) if args.batches[0] == 1 else None,
                     "call_ms_p50": round(lat_ms[len(lat_ms) // 2], 1), "call_ms_max": round(lat_ms[-1], 1), "same_as_single": same})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = run(argv)
    return 0 if all(r["same_as_single"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
