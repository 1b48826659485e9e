"""How often the next item shares its leading codes with the last one, for one or more ID sets.

    python tools/id_predictability.py --split data/beauty/splits/loo --ids data/beauty/ids data/beauty/ids_beh

For each ``sids.parquet`` folder: the share of validation users whose target has the same first
code (and the same first two codes) as their last history item, and the same over consecutive
items of the training sequences. IDs whose codes are shared more often along sequences are easier
for the decoder to predict; the validation figure is the one to trust when the IDs were built from
the training split (``cobra ids behaviour.sequences=...``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def codes_of(ids_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(ids_dir / "sids.parquet", columns=["item_id", "code_0", "code_1"])
    order = np.argsort(table.column("item_id").to_numpy())
    ids = table.column("item_id").to_numpy()[order]
    return ids, np.stack([table.column("code_0").to_numpy()[order], table.column("code_1").to_numpy()[order]], 1)


def share(a: np.ndarray, b: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> tuple[float, float]:
    ca, cb = codes[np.searchsorted(ids, a)], codes[np.searchsorted(ids, b)]
    first = ca[:, 0] == cb[:, 0]
    return float(first.mean()), float((first & (ca[:, 1] == cb[:, 1])).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="split folder with train/ (sequences) and valid/ (examples)")
    parser.add_argument("--ids", nargs="+", required=True, help="`cobra ids` output folders")
    args = parser.parse_args()
    split = Path(args.split)
    train = ds.dataset(split / "train").to_table(columns=["item_ids"]).column(0).combine_chunks()
    flat = np.asarray(train.flatten(), dtype=np.int64)
    lengths = np.asarray(train.value_lengths(), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    inner = np.ones(len(flat), dtype=bool)
    inner[(starts + lengths - 1)[lengths > 0]] = False  # the last item of a sequence has no successor here
    heads = np.flatnonzero(inner[:-1]) if len(flat) > 1 else np.array([], dtype=np.int64)
    valid = ds.dataset(split / "valid").to_table(columns=["history", "targets"])
    rows = [(h[-1], t[0]) for h, t in zip(valid.column("history").to_pylist(), valid.column("targets").to_pylist()) if h and t]
    last, target = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    for folder in args.ids:
        ids, codes = codes_of(Path(folder))
        v0, v01 = share(last, target, ids, codes)
        t0, t01 = share(flat[heads], flat[heads + 1], ids, codes)
        print(json.dumps({"ids": folder, "valid_users": len(rows), "valid_share_code0": round(v0, 4), "valid_share_code01": round(v01, 4),
                          "train_pairs": int(len(heads)), "train_share_code0": round(t0, 4), "train_share_code01": round(t01, 4)}))


if __name__ == "__main__":
    main()
