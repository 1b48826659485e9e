"""Bounded load test of the Serve app on 127.0.0.1: batching on/off, a replica killed, a fuzz stream.

Starts the app in-process (``cobra serve``'s code path), then runs phases, each bounded by
a request count *and* a duration (whichever ends first), at a fixed client concurrency:

* ``batched``    user_config max_batch_size=B: QPS, p50/p99 latency
* ``unbatched``  user_config max_batch_size=1 (same replicas, reconfigured live)
* ``kill``       batched; one Recommender replica is SIGKILLed by PID a third of the way
                 in; clients retry (connection errors, 5xx) with backoff; counts requests
                 that never got a 200 (lost), retried requests, and the replica restart
* ``fuzz``       malformed requests from the OpenAPI schema (cobra_scale.serve.fuzz);
                 counts answers outside 4xx (must be 0)

Histories are real ones from the run's test split. The client shares the machine with
the server: on a small machine report figures with the load noted.

    python tools/load_test.py --run data/demo/run --requests 3000 --duration 60 --concurrency 32 \\
        --replicas 2 --shards 2 --batch 32 --out runs/load_test.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only Ray

log = logging.getLogger("load_test")


@dataclass
class PhaseResult:
    name: str
    sent: int = 0
    ok: int = 0
    lost: int = 0  # never answered 200 after every retry
    retried: int = 0  # needed more than one attempt
    elapsed_s: float = 0.0
    statuses: dict = field(default_factory=dict)  # final status -> count ("conn" = connection error)
    latencies_ms: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "phase": self.name, "sent": self.sent, "ok": self.ok, "lost": self.lost, "retried": self.retried,
            "elapsed_s": round(self.elapsed_s, 2), "qps": round(self.ok / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))}, **self.notes,
        }


async def drive(url: str, bodies, result: PhaseResult, count: int, duration_s: float, concurrency: int, retries: int,
                expect_ok: bool = True, on_progress=None) -> PhaseResult:
    """Send up to ``count`` requests for at most ``duration_s`` with ``concurrency`` clients."""
    import aiohttp

    deadline = time.monotonic() + duration_s
    next_index = 0
    started = time.monotonic()

    async def one(session, body, headers) -> None:
        t0 = time.perf_counter()
        status: int | str = "conn"
        for attempt in range(retries + 1 if expect_ok else 1):
            try:
                async with session.post(f"{url}/recommend", data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = "conn"
            except ValueError:  # e.g. a malformed header the client library refuses to send
                status = "unsendable"
                break
            if not expect_ok or status == 200 or (isinstance(status, int) and 400 <= status < 500):
                break
            await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        if attempt > 0:
            result.retried += 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.ok += 1
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        elif expect_ok:
            result.lost += 1

    async def worker(session) -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            result.sent += 1
            body, headers = bodies(i)
            await one(session, body, headers)
            if on_progress:
                on_progress(i)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed_s = time.monotonic() - started
    return result


def recommender_pids(app: str) -> list[int]:
    """PIDs of the live Recommender replicas among this process's descendants (the Ray it started)."""
    import psutil

    title = f"ray::ServeReplica:{app}:Recommender"
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and " ".join(proc.cmdline()).startswith(title):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(pids)


def histories_of(run: Path, limit: int) -> list[list[int]]:
    """Real histories (external item ids) from the run's test split."""
    from cobra_scale.config import load_config
    from cobra_scale.serve.service import HistoryTable
    from cobra_scale.train.configs import TrainConfig

    cfg = load_config(TrainConfig, run / "config.yaml")
    table = HistoryTable.load(Path(cfg.data) / "splits" / cfg.split / "test")
    window = cfg.model.max_items - 1
    out = [table.items[table.offsets[i] : table.offsets[i + 1]][-window:].tolist() for i in range(min(limit, len(table)))]
    return [h for h in out if h]


def catalogue_max_id(run: Path) -> int:
    """The largest item id of the run's catalogue: ids above it are unknown to the server."""
    from cobra_scale.config import load_config
    from cobra_scale.data.io import read_table
    from cobra_scale.train.configs import TrainConfig

    cfg = load_config(TrainConfig, run / "config.yaml")
    return int(np.max(np.asarray(read_table(cfg.items_path, columns=["item_id"]).column("item_id"))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder of `cobra train`")
    p.add_argument("--requests", type=int, default=2000, help="requests per phase (upper bound)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase (upper bound)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests before each phase")
    p.add_argument("--replicas", type=int, default=2, help="recommender replicas (>= 2 for the kill phase)")
    p.add_argument("--shards", type=int, default=2, help="index shard deployments")
    p.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched phases")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched phases")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beams", type=int, default=0, help="beams per request (0 = the run's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per recommender replica")
    p.add_argument("--retries", type=int, default=5, help="client retries on connection errors / 5xx")
    p.add_argument("--fuzz", type=int, default=1000, help="malformed requests in the fuzz phase")
    p.add_argument("--phases", default="batched,unbatched,kill,fuzz")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0 = a free one)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a ServeConfig override, repeatable (e.g. --set inference.psi=40 --set inference.free_mix_weight=0.3)")
    args = p.parse_args(argv)
    bad = [x for x in args.set if "=" not in x or not x.split("=", 1)[0].strip()]
    if bad:
        print(f"error: --set takes KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import socket
    import urllib.error
    import urllib.request

    from cobra_scale.config import load_config
    from cobra_scale.serve.configs import ServeConfig
    from cobra_scale.serve.fuzz import JSON, malformed_requests
    from cobra_scale.serve.run_serve import deploy, local_service

    run = Path(args.run).resolve()
    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    histories = histories_of(run, 5000)
    if not histories:
        print("error: the run's test split holds no history", file=sys.stderr)
        return 2
    extra = {"beams": args.beams} if args.beams else {}

    def valid_body(i: int):
        return json.dumps({"items": histories[(i * 7919) % len(histories)], "k": args.k, **extra}).encode(), JSON

    def config(batch: int) -> ServeConfig:
        cfg = load_config(ServeConfig, dotlist=[
            f"run={run}", f"port={args.port}", f"replicas={args.replicas}", f"shards={args.shards}", f"threads={args.threads}",
            f"max_ongoing_requests={max(64, 2 * args.batch)}", "recommender_cpus=0.5", "ready_timeout_s=900", *args.set,
        ])
        cfg.user_config = {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait if batch > 1 else 0.0}
        return cfg

    from cobra_scale.errors import CobraError
    from cobra_scale.serve.app import base_settings

    try:  # a bad --set is a one-line error here, not a traceback from inside the service
        base_settings(config(args.batch), run)
    except CobraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    results: list[dict] = []
    started = time.time()
    with local_service(config(args.batch)) as url:
        def get(path):
            return json.loads(urllib.request.urlopen(url + path, timeout=60).read())

        def set_batch(batch: int):
            deploy(config(batch))
            deadline = time.monotonic() + 600
            while get("/models")["models"]["default"].get("settings", {}).get("max_batch_size") != batch:
                if time.monotonic() > deadline:
                    raise RuntimeError("reconfiguration did not take effect")
                time.sleep(0.5)

        async def phase(name: str, batch: int, kill: bool = False) -> dict:
            set_batch(batch)
            await drive(url, valid_body, PhaseResult("warmup"), args.warmup, args.duration, args.concurrency, args.retries)
            res = PhaseResult(name, notes={"max_batch_size": batch, "concurrency": args.concurrency, "replicas": args.replicas})
            killed: dict = {}
            if kill:
                pids = recommender_pids("cobra")
                res.notes["replica_pids_before"] = pids
                if len(pids) < 2:
                    res.notes["kill"] = "skipped: needs >= 2 replicas"
                    kill = False

            def maybe_kill(i: int):
                if kill and not killed and i >= args.requests // 3:
                    victim = recommender_pids("cobra")[0]
                    os.kill(victim, signal.SIGKILL)  # a replica of the cluster this tool started
                    killed.update(pid=victim, at_request=i, at_s=round(time.monotonic() - t0, 2))
                    log.info("killed recommender replica pid %d at request %d", victim, i)

            def batching() -> dict:
                return get("/models")["models"]["default"].get("batching") or {}

            seen = batching() if args.replicas == 1 and not kill else None  # /models answers from one replica
            t0 = time.monotonic()
            await drive(url, valid_body, res, args.requests, args.duration, args.concurrency, args.retries, on_progress=maybe_kill)
            if seen is not None:
                now = batching()
                batches = now.get("batches", 0) - seen.get("batches", 0)
                if batches > 0:  # how full the replica's batches were, and what one cost (the model step + shard calls)
                    res.notes["mean_batch"] = round((now["requests"] - seen["requests"]) / batches, 2)
                    res.notes["mean_batch_ms"] = round(1000 * (now["seconds"] - seen["seconds"]) / batches, 1)
            if kill:
                res.notes["killed"] = killed
                deadline = time.monotonic() + 300
                while len(recommender_pids("cobra")) < args.replicas and time.monotonic() < deadline:
                    time.sleep(1)
                res.notes["replica_pids_after"] = recommender_pids("cobra")
                res.notes["replaced_s"] = round(time.monotonic() - t0 - killed.get("at_s", 0), 1)
            out = res.summary()
            log.info("%s: %s", name, out)
            return out

        async def fuzz_phase() -> dict:
            openapi = get("/openapi.json")
            max_id = catalogue_max_id(run)  # not the histories' largest id: the catalogue may hold larger ones
            cases = malformed_requests(openapi, {"items": histories[0], "k": args.k}, seed=args.seed, unknown_items=[max_id + 1, max_id + 1000])
            drawn = [next(cases) for _ in range(args.fuzz)]
            res = PhaseResult("fuzz")
            labels: dict[str, set] = {}

            def body(i: int):
                return drawn[i][1], drawn[i][2]

            await drive(url, body, res, args.fuzz, max(args.duration, 600), args.concurrency, 0, expect_ok=False)
            out = res.summary()
            non_4xx = sum(v for k, v in res.statuses.items() if k != "unsendable" and not (isinstance(k, int) and 400 <= k < 500))
            # replay the non-4xx ones sequentially to name them
            if non_4xx:
                for label, data, headers in drawn:
                    req = urllib.request.Request(url + "/recommend", data=data, headers=headers, method="POST")
                    try:
                        code = urllib.request.urlopen(req, timeout=60).status
                    except urllib.error.HTTPError as exc:
                        code = exc.code
                    except (OSError, ValueError):
                        code = "conn"
                    if not (isinstance(code, int) and 400 <= code < 500):
                        labels.setdefault(str(code), set()).add(label)
            out.update(non_4xx=non_4xx, distinct_cases=len({d[0] for d in drawn}), non_4xx_cases={k: sorted(v)[:20] for k, v in labels.items()})
            log.info("fuzz: %s", out)
            return out

        for name in phases:
            if name == "batched":
                results.append(asyncio.run(phase("batched", args.batch)))
            elif name == "unbatched":
                results.append(asyncio.run(phase("unbatched", 1)))
            elif name == "kill":
                results.append(asyncio.run(phase("kill", args.batch, kill=True)))
            elif name == "fuzz":
                results.append(asyncio.run(fuzz_phase()))
            else:
                print(f"error: unknown phase {name}", file=sys.stderr)
                return 2
    report = {"run": str(run), "args": vars(args), "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(), "wall_s": round(time.time() - started, 1), "phases": results}
    print("\n| phase | sent | ok | lost | retried | QPS | p50 ms | p99 ms | statuses |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['sent']} | {r['ok']} | {r['lost']} | {r['retried']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['statuses']} |")
    by = {r["phase"]: r for r in results}
    if "batched" in by and "unbatched" in by and by["unbatched"]["qps"]:
        print(f"\nbatching speed-up: {by['batched']['qps'] / by['unbatched']['qps']:.2f}x QPS; p99 {by['batched']['p99_ms']} vs {by['unbatched']['p99_ms']} ms")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
