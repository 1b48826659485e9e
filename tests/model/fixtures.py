"""A tiny, learnable dataset on disk in the project's formats (items, splits, semantic IDs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from cobra_scale.data.io import write_table
from cobra_scale.data.schemas import EXAMPLES_SCHEMA, ITEMS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.semantic_ids.assign import sids_table

WORDS = ["rose", "matte", "velvet", "citrus", "ocean", "amber", "mint", "cedar", "honey", "pearl"]
KINDS = ["lipstick", "shampoo", "serum", "polish"]


def tiny_dataset(root: Path, n_items: int = 40, n_users: int = 120, codes: int = 4, levels: int = 2, seed: int = 0) -> Path:
    """Items 1..n (ids start at 1 like Amazon); users walk i -> i+1 (mod n) from a random start.

    Semantic IDs: code_0 = kind of the item, code_1 = (i // 4) % codes — shared buckets.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n_items + 1)
    items = pa.table(
        {
            "item_id": ids,
            "title": [f"{WORDS[i % len(WORDS)]} {KINDS[i % len(KINDS)]} no {i}" for i in ids],
            "brand": [None] * n_items,
            "categories": [[f"Beauty > {KINDS[i % len(KINDS)]}"] for i in ids],
            "price": [None] * n_items,
            "description": [None] * n_items,
        },
        schema=ITEMS_SCHEMA,
    )
    write_table(items, root / "items.parquet")
    codes_arr = np.stack([ids % len(KINDS) % codes, (ids // 4) % codes], axis=1)[:, :levels]
    write_table(sids_table(ids, codes_arr, codes), root / "ids" / "sids.parquet")
    (root / "ids" / "quantizer").mkdir(parents=True, exist_ok=True)
    (root / "ids" / "quantizer" / "quantizer.json").write_text(json.dumps({"quantizer": {"codes": codes, "levels": levels}}))
    train, valid, test = [], [], []
    for u in range(n_users):
        length = int(rng.integers(5, 12))
        start = int(rng.integers(0, n_items))
        seq = [int((start + t) % n_items) + 1 for t in range(length)]
        train.append({"user_id": u, "item_ids": seq[:-2], "timestamps": None})
        valid.append({"user_id": u, "history": seq[:-2][-20:], "history_ts": None, "targets": [seq[-2]]})
        test.append({"user_id": u, "history": seq[:-1][-20:], "history_ts": None, "targets": [seq[-1]]})
    split = root / "splits" / "loo"
    write_table(pa.Table.from_pylist(train, schema=SEQUENCES_SCHEMA), split / "train" / "part-00000.parquet")
    write_table(pa.Table.from_pylist(valid, schema=EXAMPLES_SCHEMA), split / "valid" / "part-00000.parquet")
    write_table(pa.Table.from_pylist(test, schema=EXAMPLES_SCHEMA), split / "test" / "part-00000.parquet")
    return root
