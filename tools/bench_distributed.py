"""Benchmarks of the distributed trainer (``cobra train launcher=ray``).

    # a synthetic dataset in the trainer's layout (logs -> sequences -> loo split -> random IDs)
    python tools/bench_distributed.py prepare --users 1000000 --items 100000 --out /tmp/bench/u1m
    # samples/s with 1 and 2 workers (fixed number of steps inside the first epoch)
    python tools/bench_distributed.py throughput --data /tmp/bench/u1m --workers 1 2 --steps 60
    # peak memory of the whole training job (driver + Ray + workers) at two scales
    python tools/bench_distributed.py rss --data /tmp/bench/u500k /tmp/bench/u5m --steps 60
    # Amazon Beauty: the local trainer vs 2 workers ZeRO-2, same config and time budget
    python tools/bench_distributed.py beauty --ids data/beauty/ids_rqvae --minutes 36

Each run is a ``cobra train`` subprocess; its ``metrics.jsonl`` (per optimiser step, rank 0:
wall time, time waiting for data, time in the step) gives samples/s; memory is sampled
every 0.5 s over the process tree of the job (PSS, which counts shared object-store pages
once, and the RSS sum). One JSON line per run, then a summary. Extra ``key=value``
arguments after ``--`` go to every ``cobra train``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}
# The model of configs/train/beauty.yaml; text_tokens shorter for synthetic titles.
MODEL = ["model.d_model=128", "model.encoder_dim=128", "model.text_tokens=24", "init_embeddings=false"]


def cobra(*args: str) -> list[str]:
    return [sys.executable, "-m", "cobra_scale.cli", *args]


def run_measured(cmd: list[str], interval: float = 0.5, tick: float = 1.0) -> dict:
    """Run ``cmd``; wall time, the peak PSS / RSS sum over its process tree, CPU seconds per process kind.

    PSS (``memory_full_info`` reads each process's smaps) is sampled every ``interval``
    seconds: at 0.5 s over ~30 Ray processes it costs about a quarter of a core (measured in
    session 11), which a throughput run on 2 cores cannot spare. CPU times (cheap) every ``tick``.
    """
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV.items()}}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "rss": 0, "largest_rss": 0}
    at_peak: dict[str, list[int]] = {}  # process kind -> [count, PSS] in the sample of the peak PSS
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds so far)
    done = threading.Event()

    def sample_memory(procs: list) -> None:
        pss = rss = largest = 0
        kinds: dict[str, list[int]] = {}
        for p in procs:
            try:
                info = p.memory_full_info()
                kind = cpu[p.pid][0] if p.pid in cpu else process_kind(p)  # the CPU pass just read its title
            except psutil.Error:
                continue
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            largest = max(largest, info.rss)
            entry = kinds.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += getattr(info, "pss", info.rss)
        shm = shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0  # Ray's object store lives there
        if pss > peak["pss"]:
            at_peak.clear()
            at_peak.update(kinds)
            peak["shm_at_peak"] = shm
        peak["shm"] = max(peak.get("shm", 0), shm)
        peak.update(pss=max(peak["pss"], pss), rss=max(peak["rss"], rss), largest_rss=max(peak["largest_rss"], largest))

    def sample() -> None:
        next_memory = 0.0
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = (process_kind(p), t.user + t.system)  # the latest title: a Ray worker starts as ray::IDLE
                except psutil.Error:
                    continue
            if time.perf_counter() >= next_memory:
                sample_memory(procs)
                next_memory = time.perf_counter() + interval
            done.wait(tick)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    done.set()
    thread.join()
    mb = 2**20
    wall = time.perf_counter() - start
    cpu_kinds: dict[str, float] = {}
    for kind, seconds in cpu.values():
        cpu_kinds[kind] = cpu_kinds.get(kind, 0.0) + seconds
    return {"rc": rc, "wall_s": round(wall, 1), "peak_pss_mb": round(peak["pss"] / mb), "peak_rss_sum_mb": round(peak["rss"] / mb),
            "peak_process_rss_mb": round(peak["largest_rss"] / mb),
            "shm_used_mb": {"peak": round(peak.get("shm", 0) / mb), "at_peak_pss": round(peak.get("shm_at_peak", 0) / mb)},
            "at_peak_pss_mb": {k: {"processes": n, "pss_mb": round(v / mb)} for k, (n, v) in sorted(at_peak.items(), key=lambda kv: -kv[1][1])},
            "cores_used": round(sum(cpu_kinds.values()) / wall, 2),
            "cpu_s_by_kind": {k: round(v, 1) for k, v in sorted(cpu_kinds.items(), key=lambda kv: -kv[1]) if v >= 1.0}}


def process_kind(p: psutil.Process) -> str:
    """A short label of a job process for the per-kind breakdown: Ray's own name when it set one."""
    name = p.name()
    cmd = p.cmdline()
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):  # Ray sets the process title of workers and actors
        return title.split("(")[0][:48]
    if any("raylet" in c for c in cmd[:1]) or name == "raylet":
        return "raylet"
    if any("gcs_server" in c for c in cmd[:1]):
        return "gcs_server"
    joined = " ".join(cmd[:3])
    for key in ("dashboard", "log_monitor", "monitor.py", "runtime_env", "default_worker"):
        if key in joined:
            return key
    return name[:40]


def step_stats(out: Path, skip: int, batch: int) -> dict:
    """samples/s and where the time goes, from rank 0's per-step records (first ``skip`` dropped)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    records = sorted(records, key=lambda r: r["step"])[skip:]
    if len(records) < 2:
        return {}
    seconds = records[-1]["time"] - records[0]["time"]
    steps = records[-1]["step"] - records[0]["step"]
    data_s = np.mean([r["data_s"] for r in records[1:]])
    step_s = np.mean([r["step_s"] for r in records[1:]])
    return {"steps_timed": steps, "samples_per_s": round(steps * batch / seconds, 1), "s_per_step": round(seconds / steps, 3),
            "data_wait_s_per_step": round(float(data_s), 4), "train_step_s_per_step": round(float(step_s), 4)}


def train(data: Path, ids: Path, out: Path, overrides: list[str], interval: float = 0.5) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = cobra("train", "--data", str(data), "--ids", str(ids), "--out", str(out), "--no-resume", *overrides)
    print("$", " ".join(cmd), flush=True)
    return run_measured(cmd, interval)


# ----------------------------------------------------------------------------- commands


def prepare(args) -> None:
    """Synthetic logs -> sequences -> leave-one-out split, plus random 3 x 32 semantic IDs.

    The IDs are random (not `cobra ids`): throughput and memory do not depend on what the
    codes mean, and embedding 100k item texts would dominate the preparation time.
    """
    out = Path(args.out)
    steps = [
        cobra("data", "synth", "--users", str(args.users), "--items", str(args.items), "--days", str(args.days), "--out", str(out / "raw"), "overwrite=true"),
        cobra("data", "sessionize", "--events", str(out / "raw" / "events"), "--items", str(out / "raw" / "items.parquet"), "--out", str(out / "sequences")),
        cobra("data", "split", "--sequences", str(out / "sequences"), "--out", str(out / "splits" / "loo"), "kind=loo"),
    ]
    for cmd in steps:
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **ENV})
    shutil.copy2(out / "raw" / "items.parquet", out / "items.parquet")
    from cobra_scale.data.io import read_table, write_table
    from cobra_scale.semantic_ids.assign import sids_table

    ids = np.asarray(read_table(out / "items.parquet", columns=["item_id"]).column("item_id"), dtype=np.int64)
    codes = np.random.default_rng(0).integers(0, 32, size=(len(ids), 3))
    write_table(sids_table(ids, codes, 32), out / "ids" / "sids.parquet")
    (out / "ids" / "quantizer").mkdir(parents=True, exist_ok=True)
    (out / "ids" / "quantizer" / "quantizer.json").write_text(json.dumps({"quantizer": {"codes": 32, "levels": 3, "kind": "random (benchmark)"}}))
    print(json.dumps({"prepared": str(out), "items": len(ids)}))


def throughput(args, extra: list[str]) -> None:
    results = []
    for workers in args.workers:
        out = Path(args.out_root) / f"throughput-w{workers}"
        overrides = ["launcher=ray", f"distributed.workers={workers}", f"distributed.max_steps={args.steps}", "distributed.checkpoint_every_steps=0",
                     f"batch_size={args.batch_size}", "eval_users=1000", "distributed.log_every_steps=10", *MODEL, *extra]
        measured = train(Path(args.data), Path(args.data) / "ids", out, overrides, interval=args.memory_every)
        result = {"workers": workers, **measured, **(step_stats(out, args.warmup, args.batch_size) if measured["rc"] == 0 else {})}
        users, windows = _count(Path(args.data))
        if result.get("samples_per_s"):
            result["epoch_estimate_min"] = round(windows / result["samples_per_s"] / 60, 1)
        result.update(users=users, windows_per_epoch=windows)
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) >= 2 and all(r.get("samples_per_s") for r in results):
        fewest, most = min(results, key=lambda r: r["workers"]), max(results, key=lambda r: r["workers"])
        print(json.dumps({"speedup": round(most["samples_per_s"] / fewest["samples_per_s"], 2), "workers": [fewest["workers"], most["workers"]]}))


def rss(args, extra: list[str]) -> None:
    results = []
    for data in args.data:
        out = Path(args.out_root) / f"rss-{Path(data).name}"
        overrides = ["launcher=ray", f"distributed.workers={args.workers}", f"distributed.max_steps={args.steps}", "distributed.checkpoint_every_steps=0",
                     f"batch_size={args.batch_size}", "eval_users=2000", *MODEL, *extra]
        measured = train(Path(data), Path(data) / "ids", out, overrides)
        users, windows = _count(Path(data))
        result = {"data": data, "users": users, "windows": windows, **measured}
        print(json.dumps(result), flush=True)
        results.append(result)
    if len(results) >= 2:
        print(json.dumps({"peak_pss_ratio_last_vs_first": round(results[-1]["peak_pss_mb"] / max(1, results[0]["peak_pss_mb"]), 2),
                          "peak_rss_sum_ratio_last_vs_first": round(results[-1]["peak_rss_sum_mb"] / max(1, results[0]["peak_rss_sum_mb"]), 2)}))


def beauty(args, extra: list[str]) -> None:
    common = ["-c", str(ROOT / "configs" / "train" / "beauty.yaml")]
    ids = str(Path(args.ids).resolve())
    out_root = Path(args.out_root)
    budget = [f"max_minutes={args.minutes}", f"batch_size={args.batch_size}", f"eval_users={args.eval_users}", f"ids={ids}", *extra]
    results = {}
    for name, launcher in (("local", ["launcher=local"]), ("ray_zero2_w2", ["launcher=ray", "distributed.workers=2", "distributed.deepspeed=configs/deepspeed/zero2.json"])):
        out = out_root / f"beauty-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = cobra("train", *common, f"out={out}", "resume=false", *launcher, *budget)
        print("$", " ".join(cmd), flush=True)
        measured = run_measured(cmd)
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else []
        best = max((h for h in history if "valid" in h), key=lambda h: h["valid"]["ndcg@10"], default={})
        results[name] = {**measured, "epochs": len(history), "best_epoch": best.get("epoch"), **{f"valid_{k}": round(v, 4) for k, v in best.get("valid", {}).items()}}
        print(json.dumps({name: results[name]}), flush=True)
    print("test metrics: cobra eval --run", out_root / "beauty-local", "and --run", out_root / "beauty-ray_zero2_w2", "(same grid, --split-name test)")


def _count(data: Path) -> tuple[int, int]:
    from cobra_scale.train.streaming import count_windows

    return count_windows(data / "splits" / "loo" / "train", 21)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--out", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--memory-every", type=float, default=15.0, help="seconds between PSS samples (reading smaps costs CPU the run needs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out-root", default="/tmp/bench/distributed")
    p = sub.add_parser("rss")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out-root", default="/tmp/bench/distributed")
    p = sub.add_parser("beauty")
    p.add_argument("--ids", default="data/beauty/ids_rqvae")
    p.add_argument("--minutes", type=float, default=36)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-users", type=int, default=3000)
    p.add_argument("--out-root", default="runs/bench")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
    elif args.command == "throughput":
        throughput(args, extra)
    elif args.command == "rss":
        rss(args, extra)
    else:
        beauty(args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
