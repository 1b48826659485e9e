"""Train the same COBRA model twice on Amazon Beauty batches — dense loss through the
reference B x N implementation, then through the tiled kernel — and compare loss curves.

    python tools/compare_dense_impl.py --data data/beauty --ids data/beauty/ids --steps 30

Same seed, same initial weights, same batches; prints per-step losses of both and the
largest absolute / relative difference.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from cobra_scale.config import load_config
from cobra_scale.model.cobra import CobraModel
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.data import batch_to, collate, read_sequences, training_windows, trim_tokens
from cobra_scale.train.trainer import prepare, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/beauty")
    p.add_argument("--ids", default="data/beauty/ids")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--impls", nargs=2, default=["reference", "tiled"])
    args = p.parse_args()
    cfg = load_config(TrainConfig, dotlist=[f"data={args.data}", f"ids={args.ids}", "out=/tmp/unused", "model.d_model=64", "model.encoder_dim=64"])
    catalogue, _ = prepare(cfg)
    windows = training_windows(read_sequences(f"{args.data}/splits/loo/train", catalogue), cfg.model.max_items)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(windows), generator=g).tolist()
    batches = [trim_tokens(collate([windows[j] for j in order[i * args.batch_size : (i + 1) * args.batch_size]], catalogue)) for i in range(args.steps)]
    torch.manual_seed(0)
    cfg.model.dropout = 0.0  # dropout masks would differ between the runs' RNG streams
    base = CobraModel(cfg.model)
    curves = {}
    for impl in args.impls:
        model = copy.deepcopy(base)
        model.dense_loss_impl = impl
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curves[impl] = [float(train_step(model, batch_to(b, "cpu"), opt, None, 1.0).dense.detach()) for b in batches]
    a, b = curves[args.impls[0]], curves[args.impls[1]]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [d / abs(x) for d, x in zip(diffs, a)]
    for step, (x, y) in enumerate(zip(a, b)):
        print(f"step {step:3d}  {args.impls[0]} {x:.6f}  {args.impls[1]} {y:.6f}  diff {abs(x - y):.2e}")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "max_abs_diff": max(diffs), "max_rel_diff": max(rel), "first_step_abs_diff": diffs[0]}))


if __name__ == "__main__":
    main()
