"""Behaviour vectors of items from the training sequences, to join the text embedding that
the residual quantiser sees (``cobra ids behaviour.sequences=...``).

Text-only semantic IDs put items that *read* alike in one ID; the decoder then has to
predict, from a history, which text cluster comes next. Items bought in the same
sessions need not read alike. Adding a behaviour part to the quantiser's input makes an
ID group items that read alike *and* are used alike, so that next-ID prediction carries
purchase behaviour (not in the paper, whose IDs come from text only; see docs/semantic_ids.md).

The vector of an item is its row of a truncated SVD of the positive pointwise mutual
information (PPMI) matrix of item co-occurrences within ``window`` steps of each other in
the training sequences (a classic count-based item2vec). Items absent from the sequences
(cold-start items) get a zero vector by default (``behaviour.cold=zeros``): their ID then comes
from their text alone, and on a large catalogue they fall together into a few giant IDs (their
inputs share the same empty behaviour half; 154k such items made one ID of 86,824 on the 1M-item
product-line logs, docs/semantic_ids.md). ``behaviour.cold=text`` instead gives them the behaviour
vector *predicted from their text* by a ridge map fitted on the items that have one
(:func:`fit_text_map`), saved with the quantiser so that new items assigned later get it too: a
cold item then lands among the IDs of the items that read like it.

Pass the **training** split only (e.g. ``data/beauty/splits/loo/train``), never the
sequences that hold validation or test targets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from tqdm import tqdm

from cobra_scale.errors import DataError

log = logging.getLogger(__name__)


def cooccurrence_counts(sequences: str | Path, item_ids: np.ndarray, window: int) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """Symmetric (N, N) counts of item pairs at most ``window`` steps apart in a sequence.

    ``sequences``: a Parquet file or folder with an ``item_ids`` list column, read batch by
    batch (memory grows with the distinct pairs, not the users). ``item_ids``: the catalogue's
    ids (rows of the result); sequence items not in the catalogue are dropped and counted.
    """
    import scipy.sparse as sp

    path = Path(sequences)
    if not path.exists():
        raise DataError(f"behaviour.sequences: {path} does not exist")
    try:
        dataset = ds.dataset(str(path), format="parquet")
    except Exception as exc:  # pyarrow raises several types for unreadable input
        raise DataError(f"behaviour.sequences: {path} is not readable Parquet ({exc})") from None
    if "item_ids" not in dataset.schema.names:
        raise DataError(f"behaviour.sequences: {path} has no 'item_ids' column (expected a sequences split, e.g. splits/loo/train)")
    order = np.argsort(item_ids, kind="stable")
    sorted_ids = item_ids[order]
    n = len(item_ids)
    total = sp.csr_matrix((n, n), dtype=np.float64)
    unknown = rows = 0
    for batch in tqdm(dataset.to_batches(columns=["item_ids"], batch_size=65536), desc="co-occurrences", unit="batch", leave=False):
        lists = batch.column(0)
        values = np.asarray(lists.flatten().fill_null(-1), dtype=np.int64)
        lengths = np.asarray(lists.value_lengths().fill_null(0), dtype=np.int64)
        rows += len(lengths)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        at = np.searchsorted(sorted_ids, values).clip(max=n - 1)
        known = sorted_ids[at] == values
        unknown += int((~known).sum())
        index = np.where(known, order[at], -1)
        heads, tails = [], []
        for offset in range(1, window + 1):
            if len(index) <= offset:
                break
            same = (owner[offset:] == owner[:-offset]) & (index[offset:] >= 0) & (index[:-offset] >= 0)
            a, b = index[:-offset][same], index[offset:][same]
            keep = a != b
            heads += [a[keep], b[keep]]
            tails += [b[keep], a[keep]]
        if heads:
            i, j = np.concatenate(heads), np.concatenate(tails)
            total = total + sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    if unknown:
        log.warning("behaviour.sequences: %d interaction(s) name items missing from the catalogue; dropped", unknown)
    if total.nnz == 0:
        raise DataError(f"behaviour.sequences: {path} ({rows} sequences) has no pair of catalogue items within {window} steps")
    return total


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def has_behaviour(vectors: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows that are not all zero (items that co-occur with another)."""
    return np.abs(vectors).sum(axis=1) > 0


def ppmi_svd(counts, dim: int, seed: int = 0) -> np.ndarray:
    """(N, dim) float32 item vectors: rows of U·sqrt(S) of the PPMI matrix, L2-normalised;
    all-zero for items without co-occurrences."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    counts = sp.csr_matrix(counts, dtype=np.float64)
    n = counts.shape[0]
    row = np.asarray(counts.sum(axis=1)).ravel()
    total = row.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (row[coo.row] * row[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
    k = min(dim, n - 2)
    if k <= 0:
        raise DataError(f"behaviour vectors need more than {dim + 1} items; the catalogue has {n}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    u, s, _ = svds(ppmi, k=k, v0=v0)
    vectors = (u * np.sqrt(np.maximum(s, 0.0))).astype(np.float32)
    if k < dim:
        vectors = np.pad(vectors, ((0, 0), (0, dim - k)))
    return unit_rows(vectors)


def behaviour_vectors(sequences: str | Path, item_ids: np.ndarray, dim: int, window: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``(vectors (N, dim) float32, report)`` for the catalogue ``item_ids``."""
    counts = cooccurrence_counts(sequences, item_ids, window)
    vectors = ppmi_svd(counts, dim, seed)
    covered = int(has_behaviour(vectors).sum())
    report = {"sequences": str(sequences), "dim": dim, "window": window, "pairs": int(counts.nnz), "items_with_behaviour": covered, "items": len(item_ids)}
    log.info("behaviour vectors: %d of %d items co-occur with another (%d distinct pairs)", covered, len(item_ids), counts.nnz)
    return vectors, report


def fit_text_map(text: np.ndarray, behaviour: np.ndarray, ridge: float = 1.0, chunk: int = 65_536) -> np.ndarray:
    """(D_text + 1, dim) float32 ridge map from an item's unit text embedding (and a bias) to its behaviour vector,
    fitted on the rows whose behaviour vector is non-zero (``behaviour.cold=text``); see :func:`predict_behaviour`.

    Normal equations accumulated over row chunks, so a 1M-item catalogue needs no second copy of its embeddings.
    """
    covered = np.flatnonzero(has_behaviour(behaviour))
    if len(covered) < 2:
        raise DataError("behaviour.cold=text needs items with co-occurrences to learn from; none co-occur")
    d = text.shape[1] + 1
    gram, cross = np.zeros((d, d)), np.zeros((d, behaviour.shape[1]))
    for start in range(0, len(covered), chunk):
        rows = covered[start : start + chunk]
        x = np.concatenate([unit_rows(text[rows]), np.ones((len(rows), 1), np.float32)], axis=1).astype(np.float64)
        gram += x.T @ x
        cross += x.T @ behaviour[rows].astype(np.float64)
    gram[np.arange(d - 1), np.arange(d - 1)] += ridge  # the bias is not shrunk
    return np.linalg.solve(gram, cross).astype(np.float32)


def predict_behaviour(text: np.ndarray, text_map: np.ndarray) -> np.ndarray:
    """Unit behaviour vectors predicted from text by :func:`fit_text_map`'s map (zero where the prediction is zero)."""
    if text.shape[1] + 1 != text_map.shape[0]:
        raise DataError(f"embeddings have dimension {text.shape[1]}, the behaviour map expects {text_map.shape[0] - 1}")
    x = unit_rows(text)
    return unit_rows(x @ text_map[:-1] + text_map[-1])


def fill_cold(text: np.ndarray, behaviour: np.ndarray, text_map: np.ndarray) -> tuple[np.ndarray, int]:
    """``behaviour`` with its zero rows replaced by their text's prediction; returns it and how many were filled."""
    cold = np.flatnonzero(~has_behaviour(behaviour))
    if len(cold):
        behaviour = behaviour.copy()
        behaviour[cold] = predict_behaviour(text[cold], text_map)
    return behaviour, len(cold)


def join(text: np.ndarray, behaviour: np.ndarray | None, weight: float, dim: int) -> np.ndarray:
    """The quantiser's input: [text / |text|, weight · behaviour] (behaviour rows unit or zero).

    ``behaviour=None`` (a cold-start catalogue: no interactions) joins zeros of ``dim``.
    """
    unit = unit_rows(text)
    if behaviour is None:
        behaviour = np.zeros((len(text), dim), dtype=np.float32)
    if behaviour.shape != (len(text), dim):
        raise DataError(f"behaviour vectors have shape {behaviour.shape}, expected {(len(text), dim)}")
    return np.concatenate([unit, weight * behaviour], axis=1).astype(np.float32)
