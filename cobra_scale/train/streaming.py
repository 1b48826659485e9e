"""Streaming input of the distributed trainer: Ray Data over the sequence shards.

The pipeline (memory bounded by blocks in flight, not by the number of users)::

    read_parquet(train shards, item_ids only)          Ray Data read tasks, files in a seeded order
      -> map_batches(cut_windows)                      ids -> catalogue indices -> windows,
                                                       one fixed-width row per window (-1 = pad)
      -> streaming_split(workers, equal=True)          Ray Train, order preserved
    per worker:
      iter_batches(local shuffle, seed + epoch)        deterministic given the seed
      -> collate(windows, catalogue)                   the single-process collate

The catalogue (tokens, codes: grows with items, never with users) is tokenised once by
the driver and broadcast through the object store (:func:`catalogue_arrays`); each
worker maps it zero-copy (:func:`catalogue_from_arrays`).

With ``preserve_order`` the split hands the same windows to the same rank in the same
order on every run, so a resumed run skips exactly the batches it had consumed
(:func:`iter_train_batches` ``skip``) and sees the data an uninterrupted run would.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cobra_scale.data.io import iter_batches, list_parquet_files, open_parquet
from cobra_scale.model.cobra import Batch
from cobra_scale.train.data import (
    Catalogue,
    EvalSet,
    collate,
    examples_from_table,
    length_bucketed_batches,
    trim_tokens,
)
from cobra_scale.train.windows import WINDOW_COLUMN, cut_windows, windows_of  # noqa: F401 (cut_windows: Ray Data's map function)


# ----------------------------------------------------------------------------- catalogue broadcast


def catalogue_arrays(catalogue: Catalogue) -> dict[str, np.ndarray]:
    """The catalogue as plain numpy arrays (zero-copy through Ray's object store)."""
    return {
        "item_ids": catalogue.item_ids,
        "tokens": catalogue.tokens.numpy(),
        "token_mask": catalogue.token_mask.numpy(),
        "codes": catalogue.codes.numpy(),
        "codes_per_level": np.asarray(catalogue.codes_per_level),
        "held_out": catalogue.held_out if catalogue.held_out is not None else np.zeros(0, dtype=bool),
    }


def catalogue_from_arrays(arrays: dict[str, np.ndarray]) -> Catalogue:
    """Inverse of :func:`catalogue_arrays`; tensors share the (read-only) object-store memory."""
    with warnings.catch_warnings():
        # Arrays from the object store are read-only; the catalogue is only ever indexed
        # (which copies), never written.
        warnings.simplefilter("ignore", UserWarning)
        as_tensor = torch.from_numpy
        held_out = arrays.get("held_out")
        return Catalogue(
            arrays["item_ids"], as_tensor(arrays["tokens"]), as_tensor(arrays["token_mask"]), as_tensor(arrays["codes"]), int(arrays["codes_per_level"]),
            held_out if held_out is not None and len(held_out) else None,
        )


def count_windows(path: str | Path, max_items: int) -> tuple[int, int]:
    """(users, windows) of a sequences folder, streamed over its files (list lengths only).

    Counts items missing from the catalogue too, so it can overestimate slightly; it sizes
    the learning-rate schedule and the progress bar, nothing that must be exact.
    """
    users = windows = 0
    for f in list_parquet_files(path):
        for rb in iter_batches(f, columns=["item_ids"]):
            n = np.asarray(pc.list_value_length(rb.column(0)).fill_null(0), dtype=np.int64)
            users += len(n)
            # training_windows: step max_items - 1, one window per sequence of 2..max_items items
            windows += int(np.where(n >= 2, 1 + np.maximum(0, -(-(n - max_items) // (max_items - 1))), 0).sum())
    return users, windows


def window_dataset(path: str | Path, item_ids: np.ndarray, max_items: int, seed: int, block_users: int = 4096, block_bytes: int = 0):
    """The Ray Dataset of training windows over every Parquet file under ``path``.

    ``block_bytes`` > 0 sets the dataset's target block size (Ray Data's default is 128 MB;
    ``distributed.block_mb``).
    """
    import ray

    from ray.data import FileShuffleConfig

    files = [str(f) for f in list_parquet_files(path)]
    # Files in a seeded order, the same every epoch: streaming (randomize_block_order would
    # be a barrier holding every block at once) and reproducible after a restart (a
    # per-execution reseed restarts its count in a new process). Epochs differ by the
    # workers' seeded local shuffle.
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=False)
    ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(["item_ids"])  # projection pushed into the read
    ds = ds.map_batches(
        cut_windows,
        fn_kwargs={"item_ids": item_ids, "max_items": max_items},
        batch_format="pyarrow",
        batch_size=block_users,
        zero_copy_batch=True,
    )
    if block_bytes:
        ds.context.target_max_block_size = block_bytes
    return ds


def iter_train_batches(
    shard, catalogue: Catalogue, micro_batch: int, shuffle_buffer: int, seed: int, skip: int = 0, same_id_negatives: int = 0,
    length_buckets: bool = False, pool_batches: int = 16,
) -> Iterator[Batch]:
    """Collated batches of one worker's shard for one epoch, after skipping ``skip`` batches.

    ``shard`` is ``ray.train.get_dataset_shard("train")``; every call starts a new epoch.
    ``same_id_negatives`` as in :func:`~cobra_scale.train.data.collate`. With
    ``length_buckets`` the shard is read ``pool_batches`` micro-batches at a time (after the
    local shuffle); each pool's windows are sorted by length, cut into micro-batches and
    those are shuffled (seeded), as the local trainer's
    :func:`~cobra_scale.train.data.length_bucketed_batches` does: a batch pads to its own
    longest window. Either way the order is a function of the seed, so ``skip`` resumes
    exactly.
    """
    batches = shard.iter_batches(
        batch_size=micro_batch * (pool_batches if length_buckets else 1),
        batch_format="numpy",
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seed if shuffle_buffer else None,
        prefetch_batches=2,
    )
    i = 0
    for p, block in enumerate(batches):
        windows = block[WINDOW_COLUMN]
        if length_buckets:  # the block is one pool of the local trainer's bucketing
            groups = length_bucketed_batches((windows >= 0).sum(1), micro_batch, np.random.default_rng([seed, p, 1]), pool_batches)
        else:
            groups = [slice(None)]
        for rows in groups:
            if i >= skip:  # resume: the first ``skip`` were trained on before the checkpoint
                # negatives seeded by (epoch seed, batch number): a resumed run draws what an uninterrupted one would
                rng = np.random.default_rng([seed, i])
                yield trim_tokens(collate(windows_of(windows[rows]), catalogue, same_id_negatives, rng))
            i += 1


# ----------------------------------------------------------------------------- validation sample


def sample_examples(path: str | Path, catalogue: Catalogue, max_history: int, n: int, seed: int = 0) -> EvalSet:
    """``load_examples(path, ...).sample(n, seed)`` without reading all rows into memory.

    Draws the same users as :meth:`EvalSet.sample` (same generator over the same row
    order), then reads only the row groups that hold them. ``n = 0`` reads every row.
    """
    files = list_parquet_files(path)
    counts = [open_parquet(f).metadata.num_rows for f in files]
    total = sum(counts)
    columns = ["user_id", "history", "targets"]
    if not n or n >= total:
        pick = None
    else:
        pick = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    parts = []
    base = 0
    for f, rows in zip(files, counts):
        pf = open_parquet(f)
        if pick is None:
            parts.append(pf.read(columns=columns))
            base += rows
            continue
        start = 0
        for g in range(pf.num_row_groups):
            g_rows = pf.metadata.row_group(g).num_rows
            lo, hi = np.searchsorted(pick, [base + start, base + start + g_rows])
            if hi > lo:
                parts.append(pf.read_row_group(g, columns=columns).take(pa.array(pick[lo:hi] - base - start)))
            start += g_rows
        base += rows
    table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
    return examples_from_table(table, catalogue, max_history, path)
