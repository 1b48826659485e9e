"""How fast the dense path starts to learn, for a training config: a short probe.

Trains a fresh model for ``--steps`` steps (1 thread, the config's batches and schedule)
and prints, on one held-out batch of training windows (eval mode):

* the in-batch dense loss (chance = ln of the batch's unique items),
* the dense loss against the whole catalogue, freshly encoded (chance = ln N),
* the sparse loss,

plus the spread of the item vectors at initialisation and after the probe (mean and
p90 pairwise cosine over 2,000 sampled items; 1.000 = every item the same vector).

    python tools/probe_dense.py --steps 70 -- model.text_pooling=mean
    python tools/probe_dense.py --steps 70 -- model.text_pooling=mean model.item_embedding=true
    python tools/probe_dense.py --run runs/beauty_s3        # only the vector spread of a trained run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cobra_scale.config import load_config  # noqa: E402
from cobra_scale.model.cobra import CobraModel  # noqa: E402
from cobra_scale.train import trainer as T  # noqa: E402
from cobra_scale.train.configs import TrainConfig  # noqa: E402
from cobra_scale.train.data import collate, length_bucketed_batches, read_sequences, training_windows, trim_tokens  # noqa: E402
from cobra_scale.train.negatives import VectorBank  # noqa: E402


def spread(vectors: torch.Tensor, n: int = 2000) -> str:
    v = F.normalize(vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:n]], dim=-1)
    c = (v @ v.T)[~torch.eye(min(n, len(v)), dtype=torch.bool)]
    return f"mean pairwise cos {float(c.mean()):.3f}, p90 {float(c.quantile(0.9)):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/train/beauty.yaml")
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--run", help="only print the item-vector spread of this trained run")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of the config, after --")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    if args.run:
        model, catalogue, _, device = T.load_run(args.run)
        print(f"{args.run}: item vectors {spread(T.encode_catalogue(model, catalogue, device))}")
        return
    cfg = load_config(TrainConfig, args.config, dotlist=["out=/tmp/cobra_probe_dense", *args.overrides])
    torch.manual_seed(cfg.seed)
    catalogue, _ = T.prepare(cfg)
    windows = training_windows(read_sequences(Path(cfg.data) / "splits" / cfg.split / "train", catalogue), cfg.model.max_items)
    batches = length_bucketed_batches(np.array([len(w) for w in windows]), cfg.batch_size, np.random.default_rng(1))
    if args.steps >= len(batches):
        sys.exit(f"--steps must be below the {len(batches)} batches of an epoch (the last one is held out)")
    model = CobraModel(cfg.model)
    if cfg.init_embeddings:
        T.init_token_embeddings(model)
    print(f"init: item vectors {spread(T.encode_catalogue(model, catalogue, cpu))}")
    optimizer = T.make_optimizer(model, cfg)
    scheduler = T.make_scheduler(optimizer, cfg, len(batches))
    bank = VectorBank(T.encode_catalogue(model, catalogue, cpu), cfg.catalogue_negatives, catalogue.held_out) if cfg.catalogue_negatives else None
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for i in range(args.steps):
        batch = trim_tokens(collate([windows[j] for j in batches[i]], catalogue, cfg.dense_negatives, rng))
        T.train_step(model, batch, optimizer, scheduler, cfg.grad_clip, "fp32", bank=bank)
    model.eval()
    with torch.no_grad():
        held = trim_tokens(collate([windows[j] for j in batches[-1]], catalogue, 0, rng))
        in_batch = model(held)
        everything = T.encode_catalogue(model, catalogue, cpu)
        keys, ids = VectorBank(everything, -1).sample(held.item_ids)
        with_catalogue = model(held, keys, ids)
    print(f"{' '.join(args.overrides) or '(config as is)'}: {args.steps} steps in {time.perf_counter() - started:.0f}s; held-out batch "
          f"({len(held.item_ids)} items): in-batch dense {float(in_batch.dense):.3f} (chance {np.log(len(held.item_ids)):.3f}), "
          f"catalogue dense {float(with_catalogue.dense - in_batch.dense):.3f} (chance {np.log(len(catalogue)):.3f}), "
          f"sparse {float(in_batch.sparse):.3f}; item vectors {spread(everything)}")


if __name__ == "__main__":
    main()
