"""Indexed search inside sparse IDs vs exact search over all items, at catalogue scale.

    .venv/bin/python tools/bench_index.py                                   # 1M items, the default case
    .venv/bin/python tools/bench_index.py --items 20000 --queries 50 --json # a tiny case (the test)

Synthetic catalogue: ``--ids`` sparse IDs with Zipf-like sizes (a few IDs hold many items,
as real semantic IDs do); an item's vector is its ID's centroid plus noise, so items of
one ID are similar. Queries: ``--queries`` users x ``--beams`` beams; each beam names an
ID drawn by size (popular IDs are beamed more often) and carries a vector near it.

Measured, each on the same beam queries:

* ``ivf``: :class:`IdIvfIndex.search_in_ids` — the beam's ID list only ("ANN inside C(ID)"),
  all items of the ID returned (``k = max bucket``) or ``--per-id-k`` of them;
* ``exact_all``: exact top-k over *all* items (faiss ``IndexFlatIP``, what a search
  without the ID index costs), with ``k = --exact-k``;
* ``exact_torch``: :class:`ExactIdIndex.search_in_ids` (in-memory gather), when it fits.

Checked: for ``--check`` beams the IVF top-k equals a brute-force top-k over the ID's
items (same items and scores to 1e-5). Reported: build seconds, beam-queries/s of each
path, the speed-up of ``ivf`` over ``exact_all``, index bytes (flat and, with ``--pq``, PQ).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_catalogue(n: int, n_ids: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(vectors (n, d) float32, sids (n,), centroids (n_ids, d), id_weights (n_ids,))``."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_ids + 1) ** 0.8  # Zipf-like ID sizes
    weights /= weights.sum()
    sids = np.sort(rng.choice(n_ids, n, p=weights))  # items of one ID are often added together
    rng.shuffle(sids[: n // 2])  # ...but not always
    centroids = rng.standard_normal((n_ids, d)).astype(np.float32)
    vectors = centroids[sids] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return vectors, sids.astype(np.int64) * 7 + 1, centroids, weights  # sparse packed IDs


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--ids", type=int, default=32_768, help="sparse IDs (e.g. 32x32x32 codes)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=500, help="users; each asks --beams IDs")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--per-id-k", type=int, default=0, help="candidates per ID (0 = all items of the ID)")
    p.add_argument("--exact-k", type=int, default=100, help="k of the exact search over all items")
    p.add_argument("--pq", type=int, default=0, help="also build IVF-PQ with this many sub-quantisers (8-bit)")
    p.add_argument("--full-scan", type=int, default=0, metavar="Q",
                   help="also time IdIvfIndex.search (every item, as w/o ID and the ID-free vector ask) for Q queries at --exact-k: "
                        "the matrix-product path against scanning every list")
    p.add_argument("--check", type=int, default=200, help="beams checked against brute force")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="faiss/torch threads (0 = default)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    import faiss
    import torch

    from cobra_scale.retrieve.exact import ExactIdIndex
    from cobra_scale.retrieve.faiss_index import IdIvfIndex

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.json else print
    vectors, sids, centroids, weights = make_catalogue(args.items, args.ids, args.dim)
    rng = np.random.default_rng(1)
    n_beams = args.queries * args.beams
    beam_ids = rng.choice(len(weights), n_beams, p=weights)
    q = centroids[beam_ids] + 0.6 * rng.standard_normal((n_beams, args.dim)).astype(np.float32)
    q_sids = beam_ids.astype(np.int64) * 7 + 1
    result: dict = {"items": args.items, "ids": args.ids, "dim": args.dim, "beam_queries": n_beams, "shards": args.shards,
                    "threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(), "faiss": faiss.__version__}

    t = time.perf_counter()
    index = IdIvfIndex.build(vectors, sids, shards=args.shards)
    result["build_s"] = round(time.perf_counter() - t, 2)
    result["max_bucket"] = index.max_bucket
    result["mean_bucket_of_beams"] = round(float(np.bincount(np.searchsorted(np.unique(sids), sids))[np.searchsorted(np.unique(sids), q_sids)].mean()), 1)
    say(f"built IVF over {args.items} items / {len(index.list_sids)} IDs in {result['build_s']}s; largest ID {index.max_bucket} items")
    k = args.per_id_k or index.max_bucket
    qt = torch.from_numpy(q)
    st = torch.from_numpy(q_sids)
    secs, (items, cos) = timed(lambda: index.search_in_ids(qt, st, k=k), args.repeats)
    result["ivf_s"] = round(secs, 4)
    result["ivf_beams_per_s"] = round(n_beams / secs, 1)
    say(f"ivf search_in_ids (k={k}): {secs:.3f}s = {n_beams / secs:,.0f} beams/s")

    # correctness: brute force over the ID's items, same top-k
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    worst = 0.0
    for b in rng.choice(n_beams, min(args.check, n_beams), replace=False):
        members = np.flatnonzero(sids == q_sids[b])
        scores = unit[members] @ qn[b]
        order = np.argsort(-scores, kind="stable")[:k]
        got = items[b].numpy()
        got = got[got >= 0]
        assert set(got.tolist()) == set(members[order].tolist()) or np.allclose(np.sort(cos[b][: len(got)].numpy()), np.sort(scores[order]), atol=1e-5), f"beam {b}: top-k differs"
        worst = max(worst, float(np.abs(np.sort(cos[b][: len(got)].numpy()) - np.sort(scores[order])).max()) if len(got) else 0.0)
    result["checked_beams"] = int(min(args.check, n_beams))
    result["max_score_diff"] = worst
    say(f"checked {result['checked_beams']} beams against brute force: same top-{k}, max |score diff| {worst:.2e}")

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(unit.astype(np.float32))
    secs, _ = timed(lambda: flat.search(qn.astype(np.float32), args.exact_k), max(1, args.repeats - 1))
    result["exact_all_s"] = round(secs, 4)
    result["exact_all_beams_per_s"] = round(n_beams / secs, 1)
    result["speedup_vs_exact_all"] = round(result["exact_all_s"] / result["ivf_s"], 1)
    say(f"exact over all items (faiss Flat, k={args.exact_k}): {secs:.3f}s = {n_beams / secs:,.0f} beams/s -> ivf is {result['speedup_vs_exact_all']}x faster")

    if args.full_scan:
        from cobra_scale.retrieve.faiss_index import _merge

        fq = qt[: args.full_scan]
        index.search(fq[:1], 1)  # builds the shards' copies of their vectors (once per index)
        secs, (f_items, f_scores) = timed(lambda: index.search(fq, args.exact_k), args.repeats)
        n_lists, xq = len(index.list_sids), qn[: args.full_scan].astype(np.float32)
        l_secs, (l_items, l_scores) = timed(lambda: _merge([sh.scan_lists(xq, args.exact_k, n_lists) for sh in index.shards], args.exact_k),
                                            max(1, args.repeats - 1))
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.exact_k for a, b in zip(f_items.numpy(), l_items)])
        result["full_scan"] = {"queries": len(fq), "k": args.exact_k, "matrix_product_s": round(secs, 4), "list_scan_s": round(l_secs, 4),
                               "speedup": round(l_secs / secs, 2), "top_k_overlap": round(float(overlap), 6),
                               "max_score_diff": float(np.abs(f_scores.numpy() - l_scores).max())}
        say(f"search over all items, {len(fq)} queries, k={args.exact_k}: matrix products {secs:.3f}s, scanning every list {l_secs:.3f}s "
            f"({l_secs / secs:.2f}x); same top-k {overlap:.4f}")

    gather_bytes = n_beams * index.max_bucket * args.dim * 4
    if gather_bytes < 2 << 30:
        exact = ExactIdIndex(torch.from_numpy(vectors), torch.from_numpy(sids))
        secs, _ = timed(lambda: exact.search_in_ids(qt, st), max(1, args.repeats - 1))
        result["exact_torch_s"] = round(secs, 4)
        result["exact_torch_beams_per_s"] = round(n_beams / secs, 1)
        say(f"ExactIdIndex (torch gather): {secs:.3f}s = {n_beams / secs:,.0f} beams/s")
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        result["flat_bytes"] = sum(f.stat().st_size for f in Path(tmp).glob("*.faiss"))
    if args.pq:
        t = time.perf_counter()
        pq = IdIvfIndex.build(vectors, sids, shards=args.shards, kind="pq", pq_m=args.pq)
        result["pq_build_s"] = round(time.perf_counter() - t, 2)
        secs, (p_items, _) = timed(lambda: pq.search_in_ids(qt, st, k=min(k, 50)), args.repeats)
        top = items[:, : min(k, 50)].numpy()
        overlap = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (a >= 0).sum()) for a, b in zip(top, p_items.numpy())])
        result["pq_beams_per_s"] = round(n_beams / secs, 1)
        result["pq_recall_of_flat_top50"] = round(float(overlap), 4)
        with tempfile.TemporaryDirectory() as tmp:
            pq.save(tmp)
            result["pq_bytes"] = sum(f.stat().st_size for f in Path(tmp).glob("*.faiss"))
        say(f"IVF-PQ{args.pq}: {result['pq_bytes'] / 1e6:.1f} MB vs flat {result['flat_bytes'] / 1e6:.1f} MB; top-50 overlap with flat {overlap:.3f}")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
