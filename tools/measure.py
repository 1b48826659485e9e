"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python tools/measure.py -- cobra data synth --users 1000000 --out /tmp/synth

``ru_maxrss`` only reports the largest single process; workers of a pool each hold
memory at once, so this samples the RSS *sum* over the tree every 50 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil


def run_measured(cmd: list[str], interval: float = 0.05) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            done.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    result = run_measured(argv)
    print(json.dumps(result))
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
