"""End-to-end offline A/B test: two model versions served side by side on 127.0.0.1.

    python tools/ab_demo.py --run data/demo/run --events data/demo/raw/events \\
        --experiments configs/ab/demo.yaml --out data/demo/ab --users 2000

1. **Replay day.** Day D = the second-to-last day of the logs (``--day`` to choose). Every user
   active on D (up to ``--users``, a seeded sample) is a visitor; their history is their
   clicks up to the end of D, written as the server's history table.
2. **Serve.** In-process Ray on 127.0.0.1 and the A/B Serve app
   (``cobra_scale.serve.ab_app``): slot ``cobra`` (the run, BeamFusion) and slot
   ``cobra_no_fusion`` (the same weights, ``mode: no_fusion``), behind the routing ingress.
   Each visitor sends ``POST /recommend {"user_id": u, "k": K}`` once over HTTP; the ingress
   routes by the experiments file, answers with the arm, and logs the exposure.
3. **Live reshare.** The experiments file's control share is changed through the
   ingress's ``user_config`` (``--reshare-control``): ``/models`` must show the new shares
   from the same ingress process (no restart). No request is sent after it.
4. **Shutdown.** Serve shuts down; the ingress flushes its exposure log. Exposure rows must
   equal the answered requests.
5. **Outcomes + analysis.** Exposures are re-dated to day D and joined with day D+1 of the
   logs (``cobra ab outcomes``); ``cobra ab analyze`` writes the report.

Outputs under ``--out``: ``history.parquet``, ``exposures/``, ``outcomes.parquet``,
``report/{report.md,lift.png,analysis.json}``, ``demo.json`` (serving figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only
# Serve's proxy must answer its readiness check within 5 s by default; on a loaded 2-core
# machine its start-up takes longer and Serve kills it in a loop. Patience, not a fix.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

import numpy as np
import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cobra_scale.ab.analyze import run as analyze  # noqa: E402
from cobra_scale.ab.bucketing import reshare  # noqa: E402
from cobra_scale.ab.configs import AnalyzeConfig  # noqa: E402
from cobra_scale.ab.outcomes import OUTCOMES_SCHEMA, read_exposures, replay  # noqa: E402
from cobra_scale.ab.router import ab_config_to_dict, load_ab_config  # noqa: E402
from cobra_scale.config import load_config, to_yaml  # noqa: E402
from cobra_scale.data.io import read_table, write_table  # noqa: E402
from cobra_scale.data.schemas import SECONDS_PER_DAY, SEQUENCES_SCHEMA, day_of, day_start  # noqa: E402
from cobra_scale.train.configs import TrainConfig  # noqa: E402

log = logging.getLogger("ab_demo")


def visitors(events_path: Path, day: str | None, users: int, max_history: int, seed: int) -> tuple[str, pd.DataFrame]:
    """(replay day, table of user_id + item_ids) for the day's active users, clicks up to its end."""
    ev = read_table(events_path, columns=["user_id", "item_id", "ts", "event_type"]).to_pandas()
    days = sorted({day_of(int(t)) for t in np.unique(ev["ts"].to_numpy() // SECONDS_PER_DAY) * SECONDS_PER_DAY})
    if len(days) < 2:
        raise SystemExit(f"error: {events_path} spans {len(days)} day(s); the replay needs a day and the day after it")
    day = day or days[-2]
    if day not in days[:-1]:
        raise SystemExit(f"error: --day {day} must be a day of the logs with a day after it ({days[0]} .. {days[-2]})")
    end = day_start(day) + SECONDS_PER_DAY
    active = np.unique(ev.loc[(ev["ts"] >= day_start(day)) & (ev["ts"] < end), "user_id"].to_numpy())
    rng = np.random.default_rng(seed)
    if users and len(active) > users:
        active = np.sort(rng.choice(active, users, replace=False))
    clicks = ev[(ev["ts"] < end) & (ev["event_type"] == "click") & ev["user_id"].isin(active)].sort_values(["user_id", "ts"], kind="stable")
    hist = clicks.groupby("user_id")["item_id"].apply(lambda s: s.to_numpy()[-max_history:].tolist()).reset_index(name="item_ids")
    return day, hist


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/recommend", data=data, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), time.perf_counter() - t0


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=60) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="data/demo/run", help="trained run folder (`cobra train`)")
    p.add_argument("--events", default="data/demo/raw/events", help="events of the same catalogue (`cobra data synth` layout)")
    p.add_argument("--experiments", default="configs/ab/demo.yaml", help="experiments file routing slots cobra / cobra_no_fusion")
    p.add_argument("--out", default="data/demo/ab")
    p.add_argument("--day", default=None, help="replay day D (default: the second-to-last day of the logs)")
    p.add_argument("--users", type=int, default=2000, help="visitors sampled among the day's active users (0 = all)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8, help="HTTP clients in flight")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--replicas", type=int, default=1, help="recommender replicas per slot")
    p.add_argument("--reshare-control", type=float, default=0.3, help="control share pushed live through user_config at the end (0 = skip)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # a fresh experiment: old exposures would mix in
    out.mkdir(parents=True)

    max_history = load_config(TrainConfig, Path(args.run) / "config.yaml").model.max_items - 1
    day, hist = visitors(Path(args.events), args.day, args.users, max_history, args.seed)
    write_table(pa.Table.from_pydict({"user_id": hist["user_id"].astype(np.int64), "item_ids": hist["item_ids"], "timestamps": [None] * len(hist)}, schema=SEQUENCES_SCHEMA), out / "history.parquet")
    log.info("replay day %s: %d visitors (histories up to the end of the day)", day, len(hist))

    app_args = {
        "run": str(Path(args.run).resolve()), "experiments": str(Path(args.experiments).resolve()),
        "history_table": str((out / "history.parquet").resolve()), "exposures": str((out / "exposures").resolve()),
        "models": {"cobra": {}, "cobra_no_fusion": {"mode": "no_fusion"}}, "shards": 0, "replicas": args.replicas,
        "recommender_cpus": 0.5, "max_batch_size": 16, "exposure_flush_s": 1.0,
    }  # fmt: skip

    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cobra_scale.distributed import init_ray
    from cobra_scale.ab.serving import ab_app_config, serve_config
    from cobra_scale.serve.run_serve import wait_ready

    cfg = ab_app_config(app_args)  # fail here on a bad argument, not in a Serve build task
    ab = load_ab_config(cfg.experiments)

    def deploy(ab_config) -> None:
        # What `serve deploy` / `serve run config.yaml` do: a declarative config. Redeploying it
        # with another user_config is applied in place (see serve_config's docstring).
        config = serve_config(app_args, ab_config_to_dict(ab_config), port=args.port)
        (out / "serve_config.json").write_text(json.dumps(config, indent=1))
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))

    def on_term(signum, frame):  # SIGTERM (e.g. `timeout`) tears down like Ctrl-C: finally blocks run
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    temp_dir = tempfile.mkdtemp(prefix="cobra_ab_demo_")
    url = f"http://127.0.0.1:{args.port}"
    figures: dict = {"day": day, "visitors": len(hist)}
    try:
        init_ray(num_cpus=4, _temp_dir=temp_dir)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        except TimeoutError:  # Serve gives its HTTP proxy 60 s; wait_ready below keeps waiting
            log.warning("Serve's HTTP proxy is slow to start (a loaded machine?); waiting for it")
        deploy(ab)
        wait_ready(url, 900)
        figures["serve_ready_s"] = round(time.perf_counter() - started, 1)

        users = hist["user_id"].astype(int).tolist()
        results: list[tuple[int, dict, float]] = [None] * len(users)  # type: ignore[list-item]

        def one(i: int) -> None:
            results[i] = post(url, {"user_id": users[i], "k": args.k})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(len(users))))
        wall = time.perf_counter() - t0
        ok = [r for r in results if r[0] == 200]
        lat = np.array([r[2] for r in ok]) * 1000
        arms = pd.Series([r[1]["arm"] for r in ok]).value_counts().to_dict()
        figures.update({
            "requests": len(users), "answered": len(ok), "status_counts": pd.Series([r[0] for r in results]).value_counts().to_dict(),
            "qps": round(len(users) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "arms": arms, "concurrency": args.concurrency,
        })  # fmt: skip
        log.info("served %d requests in %.1fs: %s", len(users), wall, figures)

        if args.reshare_control:  # live share change through the ingress user_config
            before = get(url, "/models")["ab"]
            exp = ab.experiments[0]
            others = [a.name for a in exp.arms if a.name != exp.control]
            rest = (1.0 - args.reshare_control) / len(others)
            new_ab = reshare(ab, exp.name, {exp.control: args.reshare_control, **{o: rest for o in others}})
            (out / "experiments_reshared.yaml").write_text(to_yaml(new_ab))
            t_reshare = time.perf_counter()
            deploy(new_ab)
            deadline = time.monotonic() + 600
            after = before
            while time.monotonic() < deadline:
                try:
                    after = get(url, "/models")["ab"]
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass  # a restarting ingress would show up as a changed pid below
                if abs(after["experiments"][exp.name]["arms"][exp.control]["share"] - args.reshare_control) < 1e-9:
                    break
                time.sleep(0.5)
            figures["live_reshare"] = {
                "control_share_before": before["experiments"][exp.name]["arms"][exp.control]["share"],
                "control_share_after": after["experiments"][exp.name]["arms"][exp.control]["share"],
                "same_ingress_process": before["ingress_pid"] == after["ingress_pid"],
                "applied_after_s": round(time.perf_counter() - t_reshare, 1),
            }
            log.info("live reshare: %s", figures["live_reshare"])
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()  # graceful: the ingress's __del__ flushes the exposure log
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)

    exposures = read_table(out / "exposures").num_rows
    figures["exposure_rows"] = exposures
    figures["exposures_complete"] = exposures == figures["answered"]
    outcomes = replay(read_exposures(out / "exposures"), args.events, 1, exposure_day=day)
    write_table(pa.Table.from_pandas(outcomes, schema=OUTCOMES_SCHEMA, preserve_index=False), out / "outcomes.parquet")
    summary = analyze(AnalyzeConfig(outcomes=str(out / "outcomes.parquet"), out=str(out / "report"), experiments=cfg.experiments, bootstrap=args.bootstrap, seed=args.seed))
    # the A/A view: any next-day conversion cannot depend on the arm offline
    aa = analyze(AnalyzeConfig(outcomes=str(out / "outcomes.parquet"), out=str(out / "report_all_events"), experiments=cfg.experiments, attribution="all", bootstrap=0))
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["report"] = summary
    figures["aa_check_all_events"] = aa
    (out / "demo.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps(figures, indent=2, default=str))
    if not figures["exposures_complete"]:
        print(f"error: {exposures} exposure rows for {figures['answered']} answered requests", file=sys.stderr)
        sys.exit(1)
    return figures


if __name__ == "__main__":
    main()
