"""Peak memory and forward+backward time of the in-batch cosine contrastive loss.

    .venv/bin/python tools/bench_contrastive.py                      # full CPU table
    .venv/bin/python tools/bench_contrastive.py --batch-sizes 4096 --dims 64 --repeats 1

Every case (impl, B, d) runs in a fresh subprocess so that one case's allocator state
never leaks into the next. Keys are all distinct (N = B), positives[i] = i, the
temperature is a learnable 0-d tensor (its gradient is computed too), fp32.

Memory (CPU): the child builds its inputs, then resets the kernel's RSS high-water mark
(``echo 5 > /proc/self/clear_refs``) and runs one forward+backward; "peak MiB" is
``VmHWM - VmRSS`` measured just before, i.e. the extra resident memory of the loss and
its gradients, inputs excluded. Time: median of ``--repeats`` further runs after that
first one (which also serves as warm-up). On a GPU (``torch.cuda.is_available()``) the
same cases also run on CUDA with ``triton.testing.do_bench`` and
``torch.cuda.max_memory_allocated`` (increment over the inputs), impls reference/triton.

The reference materialises several B x N fp32 matrices (~24 bytes per logit measured
here); cases whose estimate exceeds ``--max-reference-fraction`` of the available RAM
are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

# Peak bytes per logit of the reference with a learnable temperature (measured: 6.2 GiB
# at B = N = 16384, d = 256, i.e. ~24 B: about six live fp32 B x N matrices).
REFERENCE_BYTES_PER_LOGIT = 24


def _memory_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    status = open("/proc/self/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss / 1024, hwm / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _inputs(batch: int, dim: int, device: str):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    queries = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    keys = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    positives = torch.arange(batch, device=device)
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    return queries, keys, positives, temperature


def _step(loss_fn, queries, keys, positives, temperature) -> None:
    queries.grad = keys.grad = temperature.grad = None
    loss = loss_fn(queries, keys, positives, temperature)
    loss.backward()


def run_case_cpu(impl: str, batch: int, dim: int, repeats: int, threads: int | None) -> dict:
    import torch

    from cobra_kernels import cosine_contrastive_loss

    if threads:
        torch.set_num_threads(threads)

    def loss_fn(q, k, p, t):
        return cosine_contrastive_loss(q, k, p, t, impl=impl)

    queries, keys, positives, temperature = _inputs(batch, dim, "cpu")
    rss_before, _ = _memory_mib()
    _reset_peak()
    start = time.perf_counter()
    _step(loss_fn, queries, keys, positives, temperature)
    first_s = time.perf_counter() - start
    _, hwm = _memory_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(loss_fn, queries, keys, positives, temperature)
        times.append(time.perf_counter() - start)
    return {
        "impl": impl,
        "B": batch,
        "d": dim,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "peak_mib": round(hwm - rss_before, 1),
        "first_s": round(first_s, 3),
        "time_s": round(statistics.median(times), 3) if times else round(first_s, 3),
        "repeats": repeats,
    }


def run_case_cuda(impl: str, batch: int, dim: int) -> dict:
    import torch
    import triton.testing

    from cobra_kernels import cosine_contrastive_loss

    def loss_fn(q, k, p, t):
        return cosine_contrastive_loss(q, k, p, t, impl=impl)

    queries, keys, positives, temperature = _inputs(batch, dim, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(loss_fn, queries, keys, positives, temperature)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(lambda: _step(loss_fn, queries, keys, positives, temperature))
    return {
        "impl": impl,
        "B": batch,
        "d": dim,
        "device": torch.cuda.get_device_name(),
        "peak_mib": round(peak / 2**20, 1),
        "time_s": round(ms / 1000, 4),
    }


def _available_mib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:  # pragma: no cover
        return float("inf")


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--impls", nargs="+", default=["reference", "tiled"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-reference-fraction", type=float, default=0.5,
                        help="skip reference cases whose estimated peak exceeds this share of available RAM")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA/Triton cases even with a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON line per case instead of a table")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        device, impl, batch, dim, repeats = args.child[0], args.child[1], *map(int, args.child[2:5])
        if device == "cpu":
            threads = int(args.child[5]) if len(args.child) > 5 else None
            result = run_case_cpu(impl, batch, dim, repeats, threads)
        else:
            result = run_case_cuda(impl, batch, dim)
        print(json.dumps(result))
        return 0

    rows = []
    for dim in args.dims:
        for batch in args.batch_sizes:
            for impl in args.impls:
                estimate = REFERENCE_BYTES_PER_LOGIT * batch * batch / 2**20
                if impl == "reference" and estimate > args.max_reference_fraction * _available_mib():
                    rows.append({"impl": impl, "B": batch, "d": dim, "device": "cpu",
                                 "skipped": f"estimated {estimate / 1024:.1f} GiB > "
                                            f"{args.max_reference_fraction:.0%} of available RAM"})
                else:
                    child = ["cpu", impl, str(batch), str(dim), str(args.repeats)]
                    if args.threads:
                        child.append(str(args.threads))
                    rows.append({"impl": impl, "B": batch, "d": dim, **_spawn(child)})
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)

    try:
        import torch

        has_cuda = torch.cuda.is_available() and not args.no_cuda
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        for dim in args.dims:
            for batch in args.batch_sizes:
                for impl in ("reference", "triton"):
                    rows.append({"impl": impl, "B": batch, "d": dim,
                                 **_spawn(["cuda", impl, str(batch), str(dim), "0"])})
                    if args.json:
                        print(json.dumps(rows[-1]), flush=True)

    if not args.json:
        _print_table(rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    print("| device | d | B | impl | peak MiB | time s (fwd+bwd) | mem ratio ref/impl | time ratio ref/impl |")
    print("|---|---|---|---|---|---|---|---|")
    by_key = {(r.get("device", "cpu") if r.get("device", "cpu") == "cpu" else "cuda", r["d"], r["B"], r["impl"]): r
              for r in rows}
    for r in rows:
        device = r.get("device", "cpu")
        if "skipped" in r or "error" in r:
            note = r.get("skipped") or f"error: {r['error']}"
            print(f"| {device} | {r['d']} | {r['B']} | {r['impl']} | - | - | {note} | |")
            continue
        ref = by_key.get(("cpu" if device == "cpu" else "cuda", r["d"], r["B"], "reference"), {})
        mem_ratio = time_ratio = ""
        if r["impl"] != "reference" and "peak_mib" in ref:
            mem_ratio = f"{ref['peak_mib'] / max(r['peak_mib'], 1e-9):.1f}x"
            time_ratio = f"{ref['time_s'] / r['time_s']:.2f}x"
        print(f"| {device} | {r['d']} | {r['B']} | {r['impl']} | {r['peak_mib']} | {r['time_s']} "
              f"| {mem_ratio} | {time_ratio} |")


if __name__ == "__main__":
    sys.exit(main())
