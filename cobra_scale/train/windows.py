"""Training windows from sequences: numpy and pyarrow only, no torch.

The streaming input's Ray Data read tasks run :func:`cut_windows`; unpickling it imports
this module in every Ray worker process that reads. Keeping torch (and the model) out of
it keeps those processes at ~100 MB each instead of ~300 MB, and their start in under a
second: the input pipeline's memory and start-up cost do not depend on the model code.
``tests/train/test_streaming.py`` checks that importing it leaves torch unimported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger("cobra_scale.train.data")  # one logger for "items missing from the catalogue", both paths

WINDOW_COLUMN = "window"


def index_in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ``ids`` in the sorted array ``sorted_ids``; -1 where absent."""
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


@dataclass
class ItemIndex:
    """External item id -> catalogue index, without the catalogue's text tokens."""

    item_ids: np.ndarray  # (N,) int64, sorted

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """External ids -> catalogue indices; -1 for unknown ids."""
        return index_in_sorted(self.item_ids, ids)


def list_indices(table: pa.Table, column: str, catalogue, path: str | Path) -> list[np.ndarray]:
    """The list column ``column`` of ``table`` as per-row arrays of catalogue indices.

    ``catalogue`` needs only ``index_of`` (a :class:`ItemIndex` or the full catalogue).
    """
    col = table.column(column).combine_chunks()
    offsets = np.asarray(col.offsets)
    idx = catalogue.index_of(np.asarray(col.values, dtype=np.int64)[offsets[0] : offsets[-1]])
    offsets = offsets - offsets[0]
    unknown = int((idx < 0).sum())
    if unknown:
        log.warning("%s: %d interaction(s) with items missing from the catalogue were skipped", path, unknown)
    return [s[s >= 0] for s in np.split(idx, offsets[1:-1])]


def training_windows(sequences: list[np.ndarray], max_items: int) -> list[np.ndarray]:
    """Cut sequences into windows of <= ``max_items`` items.

    Windows end at the sequence end and step back by ``max_items - 1`` (consecutive windows
    share one item), so every item after the first is a target exactly once, with up to
    ``max_items - 1`` items of history; sequences of < 2 items give no window.
    """
    out = []
    for seq in sequences:
        n = len(seq)
        end = n
        while end >= 2:
            start = max(0, end - max_items)
            out.append(seq[start:end])
            if start == 0:
                break
            end = start + 1
    return out


def cut_windows(table: pa.Table, item_ids: np.ndarray, max_items: int) -> dict[str, np.ndarray]:
    """A block of sequences -> its training windows as one (W, max_items) int64 column.

    Windows are those of :func:`training_windows`, right-aligned, -1 on the left (items
    missing from the catalogue are dropped, as in the local path).
    """
    sequences = list_indices(table, "item_ids", ItemIndex(item_ids), "sequences")
    windows = training_windows(sequences, max_items)
    out = np.full((len(windows), max_items), -1, dtype=np.int64)
    for row, w in enumerate(windows):
        out[row, max_items - len(w) :] = w
    return {WINDOW_COLUMN: out}


def windows_of(batch: np.ndarray) -> list[np.ndarray]:
    """Rows of a (B, max_items) window block -> the windows (padding dropped)."""
    return [row[row >= 0] for row in batch]
