"""Catalogue tensors and batches for COBRA training and evaluation.

* :class:`Catalogue` — every item's text tokens (tokenised once with a real WordPiece
  tokenizer, [CLS] first), its sparse-ID codes, and the id <-> index mapping.
* :func:`training_windows` — training sequences cut into windows of at most
  ``max_items`` items, so every target sees up to ``max_items - 1`` history items.
* :func:`collate` — a :class:`~cobra_scale.model.cobra.Batch`: only the unique items of
  the batch are tokenised-encoded; sequences refer to them by index.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cobra_scale.data.io import read_table
from cobra_scale.data.schemas import item_texts
from cobra_scale.errors import DataError
from cobra_scale.model.cobra import Batch
from cobra_scale.train.windows import index_in_sorted, list_indices, training_windows  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclass
class Catalogue:
    item_ids: np.ndarray  # (N,) int64 external ids, sorted
    tokens: torch.Tensor  # (N, Tt) long, [CLS] ... [SEP] then 0 padding
    token_mask: torch.Tensor  # (N, Tt) long
    codes: torch.Tensor  # (N, L) long
    codes_per_level: int
    # (N,) bool: items kept out of training (a cold-start split's cold items). They are
    # never drawn as same-ID negatives; the windows already exclude them.
    held_out: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def id_buckets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`id_groups` of the catalogue's codes over the items not held out, built once and cached."""
        cached = getattr(self, "_buckets", None)
        if cached is None:
            keep = None if self.held_out is None else ~self.held_out
            cached = self._buckets = id_groups(self.codes.numpy(), self.codes_per_level, keep)
        return cached

    def hold_out(self, indices: np.ndarray) -> None:
        """Keep the items at ``indices`` out of everything training draws from the catalogue."""
        mask = np.zeros(len(self), dtype=bool)
        mask[indices] = True
        self.held_out = mask
        self._buckets = None

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """External ids -> catalogue indices; -1 for unknown ids."""
        return index_in_sorted(self.item_ids, ids)


def load_tokenizer(path: str | None = None):
    """The WordPiece tokenizer shipped with all-MiniLM-L6-v2 (or one at ``path``)."""
    from transformers import AutoTokenizer

    from cobra_scale.semantic_ids.embed import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def id_groups(codes: np.ndarray, codes_per_level: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items grouped by full sparse ID: ``(order, start, size)``.

    ``codes`` (N, L); ``order`` lists item indices sorted by ID (stable), and item i's group
    is ``order[start[i] : start[i] + size[i]]`` (itself included). With a ``keep`` mask (N,)
    only kept items are grouped: every item's group is the kept items of its ID.
    """
    packed = np.zeros(len(codes), dtype=np.int64)
    for level in range(codes.shape[1]):
        packed = packed * codes_per_level + codes[:, level]
    members = np.arange(len(codes)) if keep is None else np.flatnonzero(keep)
    order = members[np.argsort(packed[members], kind="stable")]
    sorted_ids = packed[order]
    start = np.searchsorted(sorted_ids, packed, side="left")
    return order, start, np.searchsorted(sorted_ids, packed, side="right") - start


def add_dedup_level(codes: np.ndarray, codes_per_level: int) -> np.ndarray:
    """Append codes that number the items sharing an ID (TIGER's disambiguation level).

    The rank of an item inside its ID (catalogue order) is written in base ``codes_per_level``,
    most significant digit first, in as many codes as the largest ID needs: one when no ID
    holds more than ``codes_per_level`` items (TIGER's case), two up to ``codes_per_level**2``...
    Returns (N, L + digits) codes.
    """
    order, start, _ = id_groups(codes, codes_per_level)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - start[order]
    digits = 1
    while codes_per_level**digits <= rank.max(initial=0):
        digits += 1
    cols = [(rank // codes_per_level ** (digits - 1 - j)) % codes_per_level for j in range(digits)]
    return np.concatenate([codes, np.stack(cols, axis=1)], axis=1)


def load_catalogue(items_path: str | Path, sids_path: str | Path, tokenizer, text_tokens: int, codes_per_level: int, dedup: bool = False) -> Catalogue:
    """Join items and their semantic IDs; tokenise every item's text once."""
    items = read_table(items_path).sort_by("item_id")
    sids = read_table(sids_path).sort_by("item_id")
    ids = np.asarray(items.column("item_id"), dtype=np.int64)
    sid_ids = np.asarray(sids.column("item_id"), dtype=np.int64)
    if not np.array_equal(ids, sid_ids):
        missing = np.setdiff1d(ids, sid_ids)
        raise DataError(f"{sids_path} does not cover the catalogue: {len(missing)} item(s) without an ID (run `cobra ids` on these items)")
    level_cols = sorted((c for c in sids.column_names if c.startswith("code_")), key=lambda c: int(c.split("_")[1]))
    codes = np.stack([np.asarray(sids.column(c), dtype=np.int64) for c in level_cols], axis=1)
    if codes.max() >= codes_per_level:
        raise DataError(f"{sids_path} has codes >= {codes_per_level}; set the model's `codes` to the quantiser's")
    if dedup:
        codes = add_dedup_level(codes, codes_per_level)
    tokens, mask = cached_tokenize(item_texts(items), tokenizer, text_tokens)
    return Catalogue(ids, tokens, mask, torch.from_numpy(codes), codes_per_level)


TOKENIZE_CHUNK = 20_000
# Catalogues at least this large keep their tokens in a cache (1M item texts take ~3 min to
# tokenise on one core, in every train, index and eval process); smaller ones are re-tokenised.
TOKEN_CACHE_MIN = 100_000


def token_cache_dir() -> Path | None:
    """``$COBRA_CACHE_DIR/tokens`` (default ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``cobra_scale``);
    None when ``COBRA_TOKEN_CACHE=0``."""
    if os.environ.get("COBRA_TOKEN_CACHE", "1") == "0":
        return None
    base = os.environ.get("COBRA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cobra_scale"
    return Path(base) / "tokens"


def token_cache_key(texts: list[str], tokenizer, text_tokens: int) -> str | None:
    """A content key: the texts, the tokenizer's full definition and the length. None when the
    tokenizer cannot describe itself (a slow tokenizer): such catalogues are not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256()
    h.update(f"v1|{text_tokens}|{len(texts)}|".encode())
    h.update(backend.to_str().encode())
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        h.update("\0".join(texts[start : start + TOKENIZE_CHUNK]).encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def cached_tokenize(texts: list[str], tokenizer, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tokenize_texts`, through a content-keyed cache of safetensors files for large catalogues.

    A cache file that cannot be read is ignored (re-tokenised and rewritten); writes are atomic.
    """
    folder = token_cache_dir() if len(texts) >= TOKEN_CACHE_MIN else None
    key = token_cache_key(texts, tokenizer, text_tokens) if folder is not None else None
    if key is None:
        return tokenize_texts(texts, tokenizer, text_tokens)
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            saved = load_file(str(path))
            tokens, mask = saved["tokens"].long(), saved["mask"].long()
            if tokens.shape == (len(texts), text_tokens) and mask.shape == tokens.shape:
                log.info("item tokens from the cache %s", path)
                return tokens, mask
            log.warning("token cache %s has the wrong shape; re-tokenising", path)
        except Exception as err:  # a truncated or foreign file: tokenise again and overwrite it
            log.warning("token cache %s is unreadable (%s); re-tokenising", path, err)
    tokens, mask = tokenize_texts(texts, tokenizer, text_tokens)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"tokens": tokens.to(torch.int32), "mask": mask.to(torch.uint8)}, str(tmp))  # token ids < vocab << 2**31
        os.replace(tmp, path)
        log.info("item tokens cached in %s", path)
    except OSError as err:  # a read-only or full disk costs the next process a re-tokenisation, nothing more
        log.warning("could not write the token cache %s: %s", path, err)
    return tokens, mask


def tokenize_texts(texts: list[str], tokenizer, text_tokens: int, chunk: int = TOKENIZE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, (N, text_tokens) int64 each, padded and truncated.

    Tokenised in chunks into preallocated tensors: a fast tokenizer keeps per-text offsets and
    token strings for the whole call, which for 1M item texts at once peaked at 13 GiB (measured).
    """
    n = len(texts)
    tokens = torch.zeros(n, text_tokens, dtype=torch.long)
    mask = torch.zeros(n, text_tokens, dtype=torch.long)
    for start in tqdm(range(0, n, chunk), desc="tokenize items", unit="chunk", disable=n <= chunk, leave=False):
        enc = tokenizer(texts[start : start + chunk], padding="max_length", truncation=True, max_length=text_tokens, return_tensors="pt")
        tokens[start : start + chunk] = enc["input_ids"]
        mask[start : start + chunk] = enc["attention_mask"]
    return tokens, mask


def read_sequences(path: str | Path, catalogue: Catalogue, column: str = "item_ids") -> list[np.ndarray]:
    """Per-user arrays of catalogue indices from a sequences table (unknown items dropped)."""
    return list_indices(read_table(path, columns=["user_id", column]), column, catalogue, path)


@dataclass
class EvalSet:
    history: torch.Tensor  # (U, S) catalogue indices, -1 left padding
    targets: list[np.ndarray]  # per user, catalogue indices of the target(s)
    user_ids: np.ndarray

    def sample(self, n: int, seed: int = 0) -> "EvalSet":
        """A seeded sample of ``n`` users (in their original order); all users if ``n`` is 0 or larger."""
        if not n or n >= len(self.targets):
            return self
        pick = np.sort(np.random.default_rng(seed).choice(len(self.targets), n, replace=False))
        return EvalSet(self.history[torch.from_numpy(pick)], [self.targets[i] for i in pick], self.user_ids[pick])

    def without(self, user_ids: np.ndarray) -> "EvalSet":
        """The users not in ``user_ids``, in their original order."""
        keep = np.flatnonzero(~np.isin(self.user_ids, user_ids))
        return EvalSet(self.history[torch.from_numpy(keep)], [self.targets[i] for i in keep], self.user_ids[keep])


def load_examples(path: str | Path, catalogue: Catalogue, max_history: int) -> EvalSet:
    """Validation/test rows (history -> targets) as left-padded index tensors."""
    return examples_from_table(read_table(path, columns=["user_id", "history", "targets"]), catalogue, max_history, path)


def examples_from_table(table, catalogue: Catalogue, max_history: int, path: str | Path = "examples") -> EvalSet:
    """:func:`load_examples` of an already read examples table."""
    hist = list_indices(table, "history", catalogue, path)
    targets = list_indices(table, "targets", catalogue, path)
    history = torch.full((len(hist), max_history), -1, dtype=torch.long)
    for row, h in enumerate(hist):
        h = h[-max_history:]
        if len(h):
            history[row, max_history - len(h) :] = torch.from_numpy(h)
    return EvalSet(history, targets, np.asarray(table.column("user_id"), dtype=np.int64))


def cold_item_indices(split: str | Path, catalogue: Catalogue) -> np.ndarray | None:
    """Catalogue indices of a cold-start split's ``cold_items.parquet`` (-1 for ids the
    catalogue lacks); None when the split has no cold items."""
    cold_file = Path(split) / "cold_items.parquet"
    if not cold_file.is_file():
        return None
    return catalogue.index_of(np.asarray(read_table(cold_file, columns=["item_id"]).column("item_id"), dtype=np.int64))


def same_id_items(catalogue: Catalogue, items: np.ndarray, per_item: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_item`` random items sharing the full sparse ID of each of ``items`` (with
    repeats removed; may include ``items`` themselves). Hard negatives for the dense loss."""
    order, start, size = catalogue.id_buckets()
    items = items[size[items] > 1]
    if not len(items) or per_item <= 0:
        return np.zeros(0, dtype=np.int64)
    offsets = (rng.random((len(items), per_item)) * size[items][:, None]).astype(np.int64)
    return np.unique(order[start[items][:, None] + offsets])


def collate(windows: list[np.ndarray], catalogue: Catalogue, same_id_negatives: int = 0, rng: np.random.Generator | None = None) -> Batch:
    """A batch of windows (catalogue indices) -> :class:`Batch` over its unique items.

    With ``same_id_negatives`` > 0, up to that many other items of each target's sparse ID
    join the batch's items (not its sequences): the in-batch dense softmax then also has to
    tell the target from the items the ID alone cannot separate it from.
    """
    s = max(len(w) for w in windows)
    flat = np.concatenate(windows)
    if same_id_negatives > 0:
        targets = np.unique(np.concatenate([w[1:] for w in windows]))
        extra = same_id_items(catalogue, targets, same_id_negatives, rng if rng is not None else np.random.default_rng())
        unique = np.union1d(flat, extra)
        inverse = np.searchsorted(unique, flat)
    else:
        unique, inverse = np.unique(flat, return_inverse=True)
    seq = np.full((len(windows), s), -1, dtype=np.int64)
    pos = 0
    for row, w in enumerate(windows):
        seq[row, s - len(w) :] = inverse[pos : pos + len(w)]
        pos += len(w)
    u = torch.from_numpy(unique)
    return Batch(
        item_tokens=catalogue.tokens[u],
        item_token_mask=catalogue.token_mask[u],
        item_codes=catalogue.codes[u],
        item_ids=u,
        seq=torch.from_numpy(seq),
    )


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool_batches: int = 64) -> list[np.ndarray]:
    """Shuffled batches of window indices whose windows have similar lengths.

    Windows are shuffled, cut into pools of ``pool_batches`` batches, sorted by length
    inside each pool and batched; then the batches are shuffled. Every window is used once
    per epoch, and a batch pads to its own longest window, not the epoch's (Beauty's
    windows average 6.6 of at most 21 items, so random batches were ~70% padding).
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches = []
    for p in range(0, len(order), pool):
        chunk = order[p : p + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    return Batch(*(getattr(batch, f).to(device) for f in ("item_tokens", "item_token_mask", "item_codes", "item_ids", "seq")))


def trim_tokens(batch: Batch) -> Batch:
    """Drop token columns that are padding in every row (texts are often short)."""
    used = int(batch.item_token_mask.sum(1).max())
    return Batch(batch.item_tokens[:, :used], batch.item_token_mask[:, :used], batch.item_codes, batch.item_ids, batch.seq)

