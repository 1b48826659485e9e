"""Importer for the S3-Rec format of the Amazon review benchmarks (Beauty, Sports, Toys).

Input folder (see ``../shared/datasets/amazon-beauty/README.md``):

* ``sequences.txt``: ``user_id item_id item_id ...`` per line, 1-based ids, oldest first
* ``items.jsonl``: ``{"item_id": int, "asin": str, "title": str, "categories": [[str, ...], ...]}``

Output folder:

* ``items.parquet`` (:data:`ITEMS_SCHEMA`; titles HTML-unescaped; each category path
  joined as ``"Beauty > Makeup > Nails"``; brand/price/description null: not in the data)
* ``sequences/part-00000.parquet`` (:data:`SEQUENCES_SCHEMA`; no timestamps in the data,
  so ``timestamps`` is null and the order of the file is the time order)
* ``splits/loo/{train,valid,test}/`` (leave-one-out, :mod:`cobra_scale.data.split`)
* ``import_report.json`` and ``config.yaml``

Ids are kept as they are in the source (1-based), so results can be compared with
other code reading the same files.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cobra_scale.config import save_config
from cobra_scale.data.configs import AmazonConfig, SplitConfig
from cobra_scale.data.io import shard_name, write_table
from cobra_scale.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from cobra_scale.data.split import split_files
from cobra_scale.errors import DataError

log = logging.getLogger(__name__)


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a UTF-8 text file; read errors become one-line DataErrors."""
    try:
        with path.open(encoding="utf-8") as fh:
            yield from enumerate(fh, 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def read_items_jsonl(path: Path) -> tuple[pa.Table, int]:
    """Parse ``items.jsonl`` into an ITEMS_SCHEMA table; returns ``(table, n_unescaped_titles)``."""
    ids, titles, cats = [], [], []
    unescaped = 0
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        item_id = rec.get("item_id")
        if not isinstance(item_id, int) or isinstance(item_id, bool) or item_id < 0:
            raise DataError(f"{path}:{lineno}: item_id must be a non-negative integer, got {item_id!r}")
        title = rec.get("title")
        if not isinstance(title, str) or not title.strip():
            raise DataError(f"{path}:{lineno}: item {item_id} has no title")
        clean = html.unescape(title).strip()
        unescaped += clean != title.strip()
        raw_cats = rec.get("categories") or []
        if not isinstance(raw_cats, list) or not all(isinstance(c, list) for c in raw_cats):
            raise DataError(f"{path}:{lineno}: categories must be a list of lists of strings")
        paths = [" > ".join(html.unescape(str(x)) for x in c) for c in raw_cats if c]
        ids.append(item_id)
        titles.append(clean)
        cats.append(paths or None)
    if not ids:
        raise DataError(f"{path}: no items")
    id_arr = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(id_arr, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: {int((counts > 1).sum())} duplicated item_id(s), e.g. {int(uniq[counts > 1][0])}")
    n = len(ids)
    table = pa.table(
        {
            "item_id": pa.array(id_arr),
            "title": pa.array(titles, pa.string()),
            "brand": pa.nulls(n, pa.string()),
            "categories": pa.array(cats, pa.list_(pa.string())),
            "price": pa.nulls(n, pa.float64()),
            "description": pa.nulls(n, pa.string()),
        },
        schema=ITEMS_SCHEMA,
    ).sort_by("item_id")
    return table, unescaped


def read_sequences_txt(path: Path) -> pa.Table:
    """Parse ``sequences.txt`` into a SEQUENCES_SCHEMA table (timestamps null)."""
    users: list[int] = []
    lengths: list[int] = []
    values: list[np.ndarray] = []
    for lineno, line in _numbered_lines(path):
        fields = line.split()
        if not fields:
            continue
        try:
            nums = np.asarray([int(x) for x in fields], dtype=np.int64)
        except ValueError:
            raise DataError(f"{path}:{lineno}: ids must be integers") from None
        if (nums < 0).any():
            raise DataError(f"{path}:{lineno}: negative id")
        if len(nums) < 2:
            raise DataError(f"{path}:{lineno}: user {nums[0]} has no items")
        users.append(int(nums[0]))
        lengths.append(len(nums) - 1)
        values.append(nums[1:])
    if not users:
        raise DataError(f"{path}: no users")
    user_arr = np.asarray(users, dtype=np.int64)
    if len(np.unique(user_arr)) != len(user_arr):
        raise DataError(f"{path}: {len(user_arr) - len(np.unique(user_arr))} duplicated user id(s)")
    offsets = np.zeros(len(users) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.table(
        {
            "user_id": pa.array(user_arr),
            "item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values))),
            "timestamps": pa.nulls(len(users), pa.list_(pa.int64())),
        },
        schema=SEQUENCES_SCHEMA,
    )


def run(cfg: AmazonConfig) -> dict:
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    for name in ("sequences.txt", "items.jsonl"):
        if not (src / name).is_file():
            raise DataError(f"{src} has no {name} (expected the S3-Rec format: sequences.txt + items.jsonl)")
    items, unescaped = read_items_jsonl(src / "items.jsonl")
    sequences = read_sequences_txt(src / "sequences.txt")

    flat = np.asarray(sequences.column("item_ids").combine_chunks().values, dtype=np.int64)
    known = np.asarray(items.column("item_id"), dtype=np.int64)
    unknown = ~np.isin(flat, known)
    if unknown.any():
        raise DataError(f"sequences.txt references {int(unknown.sum())} interaction(s) with items missing from items.jsonl, e.g. item {int(flat[unknown][0])}")
    used = np.unique(flat)

    write_table(items, out / "items.parquet")
    n = sequences.num_rows
    bounds = np.linspace(0, n, cfg.shards + 1).astype(int)
    for s in range(cfg.shards):
        write_table(sequences.slice(bounds[s], bounds[s + 1] - bounds[s]), out / "sequences" / shard_name(s))
    split = split_files(SplitConfig(sequences=str(out / "sequences"), out=str(out / "splits" / "loo"), kind="loo", max_history=cfg.max_history))
    lengths = np.diff(np.asarray(sequences.column("item_ids").combine_chunks().offsets))
    report = {
        "users": n,
        "items": items.num_rows,
        "items_with_interactions": int(len(used)),
        "interactions": int(len(flat)),
        "mean_sequence_length": round(float(lengths.mean()), 2),
        "min_sequence_length": int(lengths.min()),
        "max_sequence_length": int(lengths.max()),
        "titles_html_unescaped": int(unescaped),
        "loo_users": split["users_out"],
        "loo_dropped_users": split["dropped_users_fewer_than_3_items"],
        "out": str(out),
    }
    (out / "import_report.json").write_text(json.dumps(report, indent=2))
    save_config(cfg, out)
    return report
