"""The serving bundle of a run: what replicas load instead of re-encoding the catalogue.

``<run>/serving/``::

    items.safetensors   item_ids (N,) int64 sorted, codes (N, L) int64, vectors (N, d) float32 (dense models)
    bundle.json         key (sha256 of best/model.safetensors), sizes, how it was made

The item vectors come from the run's own text encoder (:func:`encode_catalogue`), so a
bundle belongs to one set of weights; its ``key`` says which, and a bundle whose key no
longer matches the weights is rebuilt. Index shards read only their slice of
``vectors`` (safetensors slices), so a shard's memory is its share of the catalogue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cobra_scale.errors import CobraError
from cobra_scale.train.data import index_in_sorted

log = logging.getLogger(__name__)

BUNDLE_DIR = "serving"
ITEMS_FILE = "items.safetensors"
META_FILE = "bundle.json"


@dataclass
class Bundle:
    folder: Path
    key: str  # sha256 of the weights the vectors were encoded with
    item_ids: np.ndarray  # (N,) int64 sorted external ids; position = catalogue index
    codes: torch.Tensor  # (N, L) long
    vectors: torch.Tensor | None  # (N, d) float32, None for sparse-only models
    codes_per_level: int

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """External ids -> catalogue indices; -1 for unknown ids."""
        return index_in_sorted(self.item_ids, ids)


def weights_key(run: str | Path) -> str:
    path = Path(run) / "best" / "model.safetensors"
    if not path.is_file():
        raise CobraError(f"{run} has no best/model.safetensors (train first with `cobra train`)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_dir(run: str | Path) -> Path:
    return Path(run) / BUNDLE_DIR


def ensure_bundle(run: str | Path, rebuild: bool = False) -> Path:
    """Build ``<run>/serving`` if it is missing or was made from other weights; return it."""
    run = Path(run)
    folder = bundle_dir(run)
    key = weights_key(run)
    meta = folder / META_FILE
    if not rebuild and meta.is_file() and (folder / ITEMS_FILE).is_file():
        try:
            if json.loads(meta.read_text()).get("key") == key:
                return folder
        except json.JSONDecodeError:
            pass
    from safetensors.torch import save_file

    from cobra_scale.train.trainer import encode_catalogue, load_run

    started = time.perf_counter()
    model, catalogue, cfg, device = load_run(run)
    tensors = {"item_ids": torch.from_numpy(np.array(catalogue.item_ids, dtype=np.int64)), "codes": catalogue.codes.long().contiguous()}
    if cfg.model.use_dense:
        tensors["vectors"] = encode_catalogue(model, catalogue, device).float().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic replace of each file; concurrent builders write identical content (same weights).
    tmp = folder / f".{ITEMS_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "cobra_scale.serving.v1", "key": key})
    os.replace(tmp, folder / ITEMS_FILE)
    info = {
        "key": key,
        "items": len(catalogue),
        "levels": int(catalogue.codes.shape[1]),
        "codes_per_level": int(cfg.model.codes),
        "dim": int(tensors["vectors"].shape[1]) if "vectors" in tensors else 0,
        "weights": str(run / "best" / "model.safetensors"),
        "built_s": round(time.perf_counter() - started, 2),
    }
    tmp_meta = folder / f".{META_FILE}.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(info, indent=2))
    os.replace(tmp_meta, meta)
    log.info("serving bundle of %s: %d items encoded in %.1fs", run, len(catalogue), info["built_s"])
    return folder


def load_bundle(folder: str | Path, rows: tuple[int, int] | None = None) -> Bundle:
    """Read a bundle; ``rows=(lo, hi)`` reads only those catalogue rows (an index shard's range)."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    with safe_open(str(folder / ITEMS_FILE), framework="pt") as f:
        names = set(f.keys())
        def read(name: str):
            return f.get_slice(name)[rows[0] : rows[1]] if rows else f.get_tensor(name)

        item_ids = read("item_ids").numpy()
        codes = read("codes")
        vectors = read("vectors") if "vectors" in names else None
    return Bundle(folder, meta["key"], item_ids, codes, vectors, int(meta["codes_per_level"]))


__all__ = ["Bundle", "bundle_dir", "ensure_bundle", "load_bundle", "weights_key"]
