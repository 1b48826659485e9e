"""``cobra index``: build the sparse-ID IVF index of a catalogue; open a run with its index.

Sources of item vectors:

* a run folder (``--run``, also the folder of ``cobra export``): the best model's text
  encoder encodes every catalogue item (the vectors the Recommender uses); IDs are the
  run's codes (dedup level included);
* exported artifacts (``--vectors items.safetensors --sids sids.parquet``): a safetensors
  file with ``item_ids`` (N,) and ``vectors`` (N, d) and the IDs of ``cobra ids``.

The index folder also gets ``items.safetensors`` (``item_ids``, ``codes``, raw ``vectors``)
so that evaluation and serving can open a run without tokenising and re-encoding the
catalogue (:func:`load_recommender`), and the resolved ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cobra_scale.errors import ConfigError, DataError
from cobra_scale.retrieve.configs import IndexConfig

log = logging.getLogger(__name__)

ITEMS_FILE = "items.safetensors"


def items_from_run(run: str | Path, device: str = "auto", batch: int = 2048) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, int]:
    """``(item_ids (N,), codes (N, L), vectors (N, d), codes_per_level)`` of a run's catalogue."""
    from cobra_scale.train.trainer import encode_catalogue, load_run

    model, catalogue, _, dev = load_run(run, device)
    if not model.cfg.use_dense:
        raise ConfigError(f"{run} was trained without dense vectors (w/o Dense ablation): there is nothing to index")
    vectors = encode_catalogue(model, catalogue, dev, batch).cpu()
    return catalogue.item_ids, catalogue.codes, vectors, model.cfg.codes


def items_from_export(vectors_path: str | Path, sids_path: str | Path) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, int]:
    """The same from exported vectors + ``sids.parquet``; rows sorted by item id."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from cobra_scale.data.io import read_table

    vectors_path, sids_path = Path(vectors_path), Path(sids_path)
    for p in (vectors_path, sids_path):
        if not p.is_file():
            raise DataError(f"{p} not found")
    try:
        tensors = load_file(str(vectors_path))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{vectors_path} is not a readable safetensors file: {exc}") from exc
    if "item_ids" not in tensors or "vectors" not in tensors:
        raise DataError(f"{vectors_path} must hold 'item_ids' (N,) and 'vectors' (N, d); it has {sorted(tensors)}")
    ids, vec = tensors["item_ids"].astype(np.int64).reshape(-1), tensors["vectors"]
    if vec.ndim != 2 or len(vec) != len(ids):
        raise DataError(f"{vectors_path}: vectors {vec.shape} do not match {len(ids)} item ids")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{vectors_path}: item ids are not unique")
    order = np.argsort(ids)
    ids, vec = ids[order], vec[order]
    table = read_table(sids_path)
    if "item_id" not in table.column_names:
        raise DataError(f"{sids_path} has no item_id column (is it the sids.parquet of `cobra ids`?)")
    level_cols = sorted((c for c in table.column_names if c.startswith("code_")), key=lambda c: int(c.split("_")[1]))
    if not level_cols:
        raise DataError(f"{sids_path} has no code_* columns")
    sid_ids = np.asarray(table.column("item_id"), dtype=np.int64)
    all_codes = np.stack([np.asarray(table.column(c), dtype=np.int64) for c in level_cols], 1)
    pos = np.searchsorted(sid_ids, ids, sorter=np.argsort(sid_ids))
    pos = np.argsort(sid_ids)[pos.clip(max=len(sid_ids) - 1)]
    missing = sid_ids[pos] != ids
    if missing.any():
        raise DataError(f"{int(missing.sum())} item(s) of {vectors_path} have no ID in {sids_path} (first: {int(ids[missing][0])})")
    quantizer = sids_path.parent / "quantizer" / "quantizer.json"
    k = int(json.loads(quantizer.read_text())["quantizer"]["codes"]) if quantizer.is_file() else int(all_codes.max()) + 1
    return ids, torch.from_numpy(all_codes[pos]), torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32)), k


def save_items(folder: Path, item_ids: np.ndarray, codes: torch.Tensor, vectors: torch.Tensor, codes_per_level: int) -> None:
    from safetensors.numpy import save_file

    save_file(
        {"item_ids": np.ascontiguousarray(item_ids, dtype=np.int64), "codes": codes.numpy().astype(np.int64), "vectors": vectors.float().numpy()},
        str(folder / ITEMS_FILE),
        metadata={"format": "cobra_scale.items.v1", "codes_per_level": str(codes_per_level)},
    )


def load_items(folder: str | Path) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, int] | None:
    """``(item_ids, codes, vectors, codes_per_level)`` saved next to an index, or None."""
    from safetensors import safe_open

    path = Path(folder) / ITEMS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        k = int((f.metadata() or {}).get("codes_per_level", 0))
        ids, codes, vectors = (f.get_tensor(n) for n in ("item_ids", "codes", "vectors"))
    return ids.numpy(), codes, vectors, k


def run(cfg: IndexConfig) -> dict:
    from cobra_scale.config import save_config
    from cobra_scale.devices import pick_device
    from cobra_scale.retrieve.faiss_index import IdIvfIndex, pack_sids

    started = time.perf_counter()
    out = Path(cfg.out)
    if (out / "index.json").exists():
        if not cfg.overwrite:
            raise ConfigError(f"{out} already holds an index (pass --overwrite to replace it)")
        shutil.rmtree(out)
    if cfg.run:
        item_ids, codes, vectors, k = items_from_run(cfg.run, pick_device(cfg.device), cfg.encode_batch)
        source = {"run": str(cfg.run)}
    else:
        item_ids, codes, vectors, k = items_from_export(cfg.vectors, cfg.sids)
        source = {"vectors": str(cfg.vectors), "sids": str(cfg.sids)}
    encoded = time.perf_counter()
    sids = pack_sids(codes, k)
    index = IdIvfIndex.build(
        vectors, sids, shards=cfg.shards, kind=cfg.kind, pq_m=cfg.pq_m, pq_bits=cfg.pq_bits,
        train_size=cfg.train_size, seed=cfg.seed, progress=True,
    )
    index.max_per_id = cfg.max_per_id
    out.mkdir(parents=True, exist_ok=True)
    index.save(out, extra={"source": source, "codes_per_level": k, "levels": int(codes.shape[1]), "items_file": ITEMS_FILE if cfg.save_items else None})
    if cfg.save_items:
        save_items(out, item_ids, codes, vectors, k)
    save_config(cfg, out)
    return {
        "items": len(index),
        "ids": len(index.list_sids),
        "largest_id": index.max_bucket,
        "shards": len(index.shards),
        "kind": cfg.kind,
        "vectors_seconds": round(encoded - started, 1),
        "index_seconds": round(time.perf_counter() - encoded, 1),
        "out": str(out),
    }


INDEX_DEVICES = ("follow", "auto", "cpu", "cuda")


def index_search_device(index_device: str, model_device: str) -> str:
    """Where the faiss index searches (``IdIvfIndex.to_device``'s argument) given the model's resolved device."""
    from cobra_scale.errors import ConfigError

    if index_device not in INDEX_DEVICES:
        raise ConfigError(f"index_device must be one of {'|'.join(INDEX_DEVICES)}, got {index_device!r}")
    if index_device == "follow":
        return "auto" if str(model_device).startswith("cuda") else "cpu"
    return index_device


def load_recommender(run: str | Path, index: str | Path | None = None, device: str = "auto", index_device: str = "follow"):
    """``(Recommender, Catalogue, TrainConfig, torch.device)`` of a run, optionally on its IVF index.

    ``index_device`` places the faiss index's search copies (:meth:`IdIvfIndex.to_device`):
    ``follow`` (default) searches on the GPU when the model runs on CUDA and the faiss build
    has a GPU (else on the CPU, as ``auto``); ``cpu``, ``cuda`` and ``auto`` as there.

    With an index folder holding ``items.safetensors`` the catalogue is not tokenised and
    items are not re-encoded (the catalogue returned has ids and codes, no tokens). The run's
    transition prior (``<run>/prior``, `cobra prior`) is attached when it fits the catalogue.
    """
    from cobra_scale.config import load_config
    from cobra_scale.devices import pick_device
    from cobra_scale.errors import CobraError
    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.retrieve.faiss_index import IdIvfIndex
    from cobra_scale.retrieve.prior import load_or_build
    from cobra_scale.retrieve.recommender import Recommender
    from cobra_scale.train.configs import TrainConfig
    from cobra_scale.train.data import Catalogue
    from cobra_scale.train.trainer import encode_catalogue, load_run, load_weights

    device = pick_device(device)
    ivf = IdIvfIndex.load(index, device=index_search_device(index_device, device)) if index else None
    saved = load_items(index) if index else None
    if saved is None:
        model, catalogue, tcfg, dev = load_run(run, device)
        vectors = encode_catalogue(model, catalogue, dev) if model.cfg.use_dense else None
        if ivf is not None and len(ivf) != len(catalogue):
            raise DataError(f"index {index} holds {len(ivf)} items, the run's catalogue {len(catalogue)}")
        prior = load_or_build(run, catalogue.item_ids, build=False)
        return Recommender(model, catalogue.codes.to(dev), vectors, index=ivf, prior=prior, max_per_id=tcfg.inference.max_per_id), catalogue, tcfg, dev
    run = Path(run)
    if not (run / "best" / "model.safetensors").is_file():
        raise CobraError(f"{run} has no best/model.safetensors (train first with `cobra train`)")
    tcfg = load_config(TrainConfig, run / "config.yaml")
    item_ids, codes, vectors, k = saved
    if k and k != tcfg.model.codes or codes.shape[1] != tcfg.model.levels:
        raise DataError(f"{index}/{ITEMS_FILE} has {codes.shape[1]} levels x {k} codes, the run {tcfg.model.levels} x {tcfg.model.codes}: built from another run?")
    if vectors.shape[1] != tcfg.model.d_model:
        raise DataError(f"{index}/{ITEMS_FILE} vectors are {vectors.shape[1]}-d, the run's model {tcfg.model.d_model}-d")
    dev = torch.device(pick_device(device))
    model = CobraModel(tcfg.model).to(dev)
    load_weights(model, run / "best")
    empty = torch.zeros(len(item_ids), 0, dtype=torch.long)
    catalogue = Catalogue(item_ids, empty, empty, codes, k or tcfg.model.codes)
    prior = load_or_build(run, item_ids, build=False)
    return Recommender(model.eval(), codes.to(dev), vectors.to(dev), index=ivf, prior=prior, max_per_id=tcfg.inference.max_per_id), catalogue, tcfg, dev
