"""Benchmark ``cobra data sessionize``: wall time, rows/s and peak RSS of the process tree.

    python tools/bench_sessionize.py data/synth1m/events data/synth5m/events
    python tools/bench_sessionize.py EVENTS --out-root /tmp/bench -- --workers 4 shards=16

Each events folder is sessionised by ``tools/measure.py -- cobra data sessionize --events E
--out OUT_ROOT/<n>-<name> [extra args]``; rows come from the run's ``report.json``. Peak
RSS is the sum over the whole process tree (workers included), sampled every 50 ms. One
JSON line per run, then a table. Memory must not grow with the number of users: compare
``peak_rss_mb`` of a 1M-user and a 5M-user log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cobra_command() -> list[str]:
    """``cobra`` from this interpreter's environment (works without an activated venv)."""
    exe = Path(sys.executable).parent / "cobra"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cobra_scale.cli"]


def bench_one(events: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "measure.py"), "--", *cobra_command(),
           "data", "sessionize", "--events", events, "--out", str(out), *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    measured = json.loads(lines[-1]) if lines else {"rc": proc.returncode, "wall_s": None, "peak_rss_mb": None}
    result = {"events": events, "rc": measured["rc"], "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]}
    report_file = out / "report.json"
    if measured["rc"] == 0 and report_file.exists():
        report = json.loads(report_file.read_text())
        result.update(
            rows=report["rows_in"],
            rows_out=report["rows_out"],
            users=report["users_out"],
            partitions=report["partitions"],
            workers=report["workers"],
            inner_wall_s=report["wall_s"],
            rows_per_s=round(report["rows_in"] / measured["wall_s"]) if measured["wall_s"] else None,
            phases={k: report[k] for k in ("scatter_s", "gather_s", "merge_s") if k in report},
        )
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="arguments after -- go to cobra data sessionize")
    parser.add_argument("events", nargs="+", help="events folders (or files) to sessionise")
    parser.add_argument("--out-root", help="where outputs go (default: a temp folder, deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args(argv)
    root = Path(args.out_root) if args.out_root else Path(tempfile.mkdtemp(prefix="bench-sessionize-"))
    results = []
    try:
        for n, events in enumerate(args.events):
            out = root / f"{n}-{Path(events).resolve().parent.name}-{Path(events).name}"
            result = bench_one(events, out, extra)
            print(json.dumps(result), flush=True)
            results.append(result)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.out_root:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'events':40s} {'rows':>12s} {'users':>10s} {'wall_s':>8s} {'rows/s':>12s} {'peak_rss_mb':>12s}")
    for r in results:
        print(f"{r['events'][-40:]:40s} {r.get('rows', '-'):>12} {r.get('users', '-'):>10} {r['wall_s'] or '-':>8} "
              f"{r.get('rows_per_s', '-'):>12} {r['peak_rss_mb'] or '-':>12}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
