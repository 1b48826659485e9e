"""Users/s of large-batch evaluation, and what a whole day would cost on N workers.

    .venv/bin/python tools/bench_eval.py                                    # 1M items, 2000 users
    .venv/bin/python tools/bench_eval.py --items 5000 --users 64 --workers 0 --json   # tiny (the test)
    .venv/bin/python tools/bench_eval.py --device cuda --batch 1024         # on a GPU machine

Builds a synthetic run folder (a randomly initialised COBRA model of the given size —
inference cost does not depend on the trained weights — saved like `cobra train` saves
one) and a `cobra index` folder (IVF by sparse ID + items.safetensors) over ``--items``
items with uniformly drawn codes, then scores ``--users`` random histories with the
evaluation code of `cobra eval` (:mod:`cobra_scale.eval.batch`):

* ``local``: :func:`evaluate_local` in this process (all its threads);
* ``ray``: :func:`evaluate_ray` with ``--workers`` actors of ``--worker-cpus`` CPUs
  (in-process Ray on 127.0.0.1), skipped with ``--workers 0``.

Projection: from the measured seconds per user of one worker (local path), the wall time
of ``--day-users`` users on N such workers is ``day_users * s_per_user / (N * efficiency)``
with ``efficiency`` = Ray throughput / (workers x local throughput per worker) measured
here (1.0 when Ray was not run). It is a projection, not a measurement: it assumes workers
like this one (a GPU worker's cost must be measured on a GPU, ``--device cuda``).
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


def build_synthetic(folder: Path, items: int, levels: int, codes: int, d_model: int, seed: int = 0) -> tuple[Path, Path]:
    """A run folder (config.yaml, best/model.safetensors) and an index folder; returns both."""
    import torch

    from cobra_scale.config import load_config, save_config
    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.retrieve.build import save_items
    from cobra_scale.retrieve.faiss_index import IdIvfIndex, pack_sids
    from cobra_scale.train.configs import TrainConfig
    from cobra_scale.train.trainer import save_weights

    run = folder / "run"
    cfg = load_config(TrainConfig, dotlist=[f"data={folder}", f"ids={folder}", f"out={run}", f"model.levels={levels}", f"model.codes={codes}",
                                             f"model.d_model={d_model}", f"model.encoder_dim={d_model}", "model.vocab_size=1000"])
    torch.manual_seed(seed)
    save_weights(CobraModel(cfg.model), run / "best")
    save_config(cfg, run)
    rng = np.random.default_rng(seed)
    item_codes = torch.from_numpy(rng.integers(0, codes, (items, levels)))
    vectors = torch.from_numpy(rng.standard_normal((items, d_model)).astype(np.float32))
    index_dir = folder / "index"
    index = IdIvfIndex.build(vectors, pack_sids(item_codes, codes))
    index.save(index_dir, extra={"codes_per_level": codes, "levels": levels, "source": {"synthetic": True}})
    save_items(index_dir, np.arange(1, items + 1), item_codes, vectors, codes)
    return run, index_dir


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a projection is no more precise than its inputs)."""
    return float(f"{x:.{digits}g}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codes", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--ks", default="50,100,200,500,800")
    p.add_argument("--modes", default="cobra,no_fusion")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="Ray actors (0 = local only)")
    p.add_argument("--worker-cpus", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--day-users", type=int, default=1_000_000, help="users of the day to project for")
    p.add_argument("--project-workers", default="1,8,32,128")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch

    from cobra_scale.eval.batch import Setting, evaluate_local, evaluate_ray
    from cobra_scale.retrieve.build import load_recommender
    from cobra_scale.retrieve.recommender import InferenceParams

    say = (lambda *a: None) if args.json else print
    ks = tuple(int(k) for k in args.ks.split(","))
    settings = [Setting(m, InferenceParams(mode=m, beams=args.beams)) for m in args.modes.split(",")]
    result: dict = {"items": args.items, "levels": args.levels, "codes": args.codes, "d_model": args.d_model, "users": args.users,
                    "beams": args.beams, "ks": list(ks), "modes": args.modes.split(","), "batch": args.batch, "device": args.device,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run, index = build_synthetic(Path(tmp), args.items, args.levels, args.codes, args.d_model)
        result["setup_s"] = round(time.perf_counter() - t, 1)
        rec, _, _, device = load_recommender(run, index, args.device)
        rng = np.random.default_rng(1)
        history = torch.from_numpy(rng.integers(0, args.items, (args.users, args.history)))
        targets = [rng.integers(0, args.items, 1) for _ in range(args.users)]
        say(f"synthetic run + index of {args.items} items in {result['setup_s']}s; scoring {args.users} users x {len(settings)} settings")
        local = evaluate_local(rec, history, targets, settings, ks, args.batch, device, progress=not args.json)
        result["local_s"] = round(local.seconds, 2)
        result["local_users_per_s"] = round(args.users / local.seconds, 2)
        result["s_per_user_per_setting"] = local.seconds / args.users / len(settings)
        say(f"local: {local.seconds:.1f}s = {result['local_users_per_s']} users/s ({len(settings)} settings each)")
        efficiency = 1.0
        if args.workers > 0:
            remote = evaluate_ray(str(run), str(index), history, targets, settings, ks, args.batch, args.workers, args.worker_cpus,
                                  device=args.device, progress=not args.json)
            result["ray_workers"] = args.workers
            result["ray_s"] = round(remote.seconds, 2)
            result["ray_users_per_s"] = round(args.users / remote.seconds, 2)
            threads_local = torch.get_num_threads()
            per_worker_local = result["local_users_per_s"] * min(1.0, args.worker_cpus / threads_local)
            efficiency = result["ray_users_per_s"] / (args.workers * per_worker_local) if per_worker_local else 1.0
            result["ray_efficiency"] = round(efficiency, 3)
            say(f"ray ({args.workers} x {args.worker_cpus} CPU actors, model loading included): {remote.seconds:.1f}s = {result['ray_users_per_s']} users/s")
    s_per_user = local.seconds / args.users  # unrounded: the projection scales it by large factors
    eff = min(1.0, efficiency) if efficiency > 0 else 1.0
    result["projection"] = {
        "what": f"{args.day_users} users x {len(settings)} settings on N workers like this one ({args.device}, {torch.get_num_threads()} threads), "
                f"efficiency {eff:.2f}; a projection from the measured per-user cost, not a measurement",
        "seconds": {int(n): _sig(args.day_users * s_per_user / (int(n) * eff)) for n in args.project_workers.split(",")},
        "hours": {int(n): _sig(args.day_users * s_per_user / (int(n) * eff) / 3600) for n in args.project_workers.split(",")},
    }
    say("projection (hours for the day): " + ", ".join(f"{n} workers: {h}" for n, h in result["projection"]["hours"].items()))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
