"""Micro-benchmarks of the A/B layer: routing, offline assignment, exposure logging.

    python tools/bench_ab.py --ids 200000 --out /tmp/bench_ab.json

Prints (and writes) microseconds per ``ABRouter.route``, ids/s of vectorised assignment,
microseconds per ``ExposureLogger.log`` from 1 and 4 threads (with the writer thread
running), and the wall time of ``close()`` for what is left. Report the load average with
the figures: on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.ab.assign import assign_ids  # noqa: E402
from cobra_scale.ab.exposure import ExposureLogger  # noqa: E402
from cobra_scale.ab.router import ABRouter, load_ab_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", default="configs/ab/beamfusion.yaml")
    p.add_argument("--ids", type=int, default=200_000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = load_ab_config(args.experiments)
    router = ABRouter(cfg)
    res: dict = {"load_avg_1m_before": os.getloadavg()[0], "layers": len(cfg.layers), "ids": args.ids}

    n = min(args.ids, 100_000)
    t = time.perf_counter()
    for u in range(n):
        router.route(u)
    res["route_us"] = round((time.perf_counter() - t) / n * 1e6, 2)

    t = time.perf_counter()
    assign_ids(cfg, list(range(args.ids)))
    res["assign_ids_per_s"] = round(args.ids / (time.perf_counter() - t))

    items, scores = list(range(10)), [0.1] * 10
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (1, 4):
            logger = ExposureLogger(Path(tmp) / f"t{threads}", flush_rows=10_000, flush_interval_s=0.5)
            per = n // threads

            def work(offset: int) -> None:
                for i in range(per):
                    logger.log(str(offset + i), "beamfusion", "cobra", items, scores, model="cobra")

            ws = [threading.Thread(target=work, args=(k * per,)) for k in range(threads)]
            t = time.perf_counter()
            for w in ws:
                w.start()
            for w in ws:
                w.join()
            res[f"log_us_per_call_{threads}_threads"] = round((time.perf_counter() - t) / (per * threads) * 1e6, 2)
            t = time.perf_counter()
            logger.close()
            res[f"close_s_{threads}_threads"] = round(time.perf_counter() - t, 3)
            res[f"rows_written_{threads}_threads"] = logger.stats["written"]
    res["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
