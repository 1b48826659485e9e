"""Benchmark ``cobra data synth`` at several scales: wall time, throughput, peak RSS.

    python tools/bench_synth.py --users 500000 1000000 5000000 --items 100000 --days 7 \\
        --out-root /tmp/bench_synth

Each scale runs as ``python tools/measure.py -- cobra data synth ...`` (so the peak RSS is the
sum over the whole process tree, workers included) into ``OUT_ROOT/users-N`` (overwritten),
and the event counts come from the run's ``synth_stats.json``. The last column is the peak
RSS relative to the first scale: it should stay near 1.0 (memory must not grow with users).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent


def cobra_command() -> list[str]:
    """The ``cobra`` console script of this interpreter's environment (or ``python -m``)."""
    script = Path(sys.executable).parent / "cobra"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cobra_scale.cli"]


def bench_one(users: int, args: argparse.Namespace) -> dict:
    out = Path(args.out_root) / f"users-{users}"
    cmd = cobra_command() + [
        "data", "synth", "--users", str(users), "--items", str(args.items), "--days", str(args.days),
        "--workers", str(args.workers), "--seed", str(args.seed), "--out", str(out), "--overwrite",
    ]  # fmt: skip
    if args.shards:
        cmd += ["--shards", str(args.shards)]
    proc = subprocess.run([sys.executable, str(TOOLS / "measure.py"), "--", *cmd], stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"error: benchmark at {users} users failed (exit {proc.returncode}):\n{proc.stdout}")
    measured = json.loads(lines[-1])
    stats = json.loads((out / "synth_stats.json").read_text())
    if args.clean:
        shutil.rmtree(out)
    return {
        "users": users,
        "items": args.items,
        "events": stats["events"],
        "wall_s": measured["wall_s"],
        "events_per_s": round(stats["events"] / measured["wall_s"]),
        "peak_rss_mb": measured["peak_rss_mb"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="+", default=[500_000, 1_000_000, 5_000_000])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--workers", type=int, default=0, help="0 = number of CPUs")
    p.add_argument("--shards", type=int, default=0, help="0 = the generator's default (one per 100k users)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-root", default="/tmp/bench_synth")
    p.add_argument("--clean", action="store_true", help="delete each output after measuring it")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args()

    rows = []
    for users in args.users:
        rows.append(bench_one(users, args))
        print(f"measured {users} users: {rows[-1]}", file=sys.stderr, flush=True)
    header = f"{'users':>10} {'items':>8} {'events':>12} {'wall_s':>8} {'events/s':>11} {'peak_rss_mb':>12} {'rss_x':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        rss_x = r["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(f"{r['users']:>10,} {r['items']:>8,} {r['events']:>12,} {r['wall_s']:>8.1f} {r['events_per_s']:>11,} {r['peak_rss_mb']:>12.0f} {rss_x:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
