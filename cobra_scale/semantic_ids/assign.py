"""``cobra ids``: fit a residual quantiser on item-text embeddings and assign sparse IDs.

Outputs in ``out/``:

* ``sids.parquet``: ``item_id``, ``sid`` (the L codes packed into one int64,
  lexicographic), ``code_0 .. code_{L-1}`` (int32)
* ``quantizer/quantizer.json`` (kind, shape, embedding model, fit report) and
  ``quantizer/model.safetensors`` (RQ-VAE state dict or k-means centroids)
* ``embeddings.safetensors``: the cached item embeddings (keyed by item id + text hash)
* ``diagnostics.json``, ``items_per_id.png``, ``config.yaml``

With ``quantizer_dir=...`` the saved quantiser assigns IDs to (new) items without any
retraining: the cold-start path. A quantiser fitted with ``behaviour.cold=text`` also saves
``quantizer/behaviour_map.safetensors`` (text -> behaviour ridge map) for those new items.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cobra_scale.config import save_config
from cobra_scale.data.io import read_table, write_table
from cobra_scale.errors import CobraError, DataError
from cobra_scale.semantic_ids.behaviour import join, predict_behaviour
from cobra_scale.semantic_ids.configs import EmbedConfig, IdsConfig, QuantizerConfig
from cobra_scale.semantic_ids.diagnostics import bucket_histogram, diagnose, format_report, pack_codes

log = logging.getLogger(__name__)

QUANTIZER_JSON = "quantizer.json"
QUANTIZER_WEIGHTS = "model.safetensors"
BEHAVIOUR_MAP = "behaviour_map.safetensors"  # behaviour.cold=text: the text -> behaviour map for items without co-occurrence
# cobra ids warns when one ID holds more than this share of the catalogue while behaviour.cold=zeros left items without behaviour
GIANT_ID_SHARE = 0.02


def sids_schema(levels: int) -> pa.Schema:
    """Schema of ``sids.parquet`` for ``levels`` code levels."""
    return pa.schema(
        [pa.field("item_id", pa.int64(), nullable=False), pa.field("sid", pa.int64(), nullable=False)]
        + [pa.field(f"code_{level}", pa.int32(), nullable=False) for level in range(levels)],
        metadata={"cobra_scale.table": "sids"},
    )


def sids_table(item_ids: np.ndarray, codes: np.ndarray, codes_per_level: int) -> pa.Table:
    cols: dict[str, Any] = {"item_id": pa.array(item_ids, pa.int64()), "sid": pa.array(pack_codes(codes, codes_per_level), pa.int64())}
    for level in range(codes.shape[1]):
        cols[f"code_{level}"] = pa.array(codes[:, level].astype(np.int32))
    return pa.table(cols, schema=sids_schema(codes.shape[1]))


class Quantizer:
    """A fitted quantiser of either kind: ``encode`` (N, D) -> codes (N, L), ``decode`` back."""

    def __init__(
        self, kind: str, impl: Any, qcfg: QuantizerConfig, input_dim: int, device: str = "cpu", behaviour: dict | None = None,
        text_map: np.ndarray | None = None,
    ):
        self.kind, self.impl, self.cfg, self.input_dim, self.device = kind, impl, qcfg, input_dim, device
        self.behaviour = behaviour  # {"dim", "weight", ...} when the input is [text, behaviour] (behaviour.py)
        self.text_map = text_map  # (D_text + 1, dim) with behaviour.cold=text, else None

    def encode(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(codes (N, L) int64, reconstructions (N, D) float32)``."""
        if vectors.shape[1] != self.input_dim:
            raise DataError(f"embeddings have dimension {vectors.shape[1]}, the quantiser expects {self.input_dim} (another embedding model?)")
        if self.kind == "rqvae":
            from cobra_scale.semantic_ids.rqvae import encode_in_batches

            return encode_in_batches(self.impl, vectors, device=self.device)
        codes = self.impl.encode(vectors)
        return codes, self.impl.decode(codes)

    def save(self, folder: Path, embed: EmbedConfig, report: dict) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "rqvae":
            tensors = {k: v.detach().cpu().contiguous().numpy() for k, v in self.impl.state_dict().items()}
        else:
            tensors = {"centroids": np.ascontiguousarray(self.impl.centroids, np.float32)}
        save_file(tensors, str(folder / QUANTIZER_WEIGHTS), metadata={"format": "cobra_scale.quantizer.v1", "kind": self.kind})
        if self.text_map is not None:
            save_file({"text_map": np.ascontiguousarray(self.text_map, np.float32)}, str(folder / BEHAVIOUR_MAP),
                      metadata={"format": "cobra_scale.behaviour_map.v1"})  # fmt: skip
        meta = {
            "format": "cobra_scale.quantizer.v1",
            "kind": self.kind,
            "input_dim": self.input_dim,
            "quantizer": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.cfg.__dict__.items()},
            "embed": {k: v for k, v in embed.__dict__.items() if k != "cache"},
            "behaviour": self.behaviour,
            "fit": report,
        }
        (folder / QUANTIZER_JSON).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> tuple["Quantizer", EmbedConfig]:
        folder = Path(folder)
        meta_path, weights = folder / QUANTIZER_JSON, folder / QUANTIZER_WEIGHTS
        if not meta_path.is_file() or not weights.is_file():
            raise CobraError(f"{folder} is not a saved quantiser (needs {QUANTIZER_JSON} and {QUANTIZER_WEIGHTS})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CobraError(f"{meta_path}: not valid JSON ({exc.msg})") from None
        if meta.get("format") != "cobra_scale.quantizer.v1":
            raise CobraError(f"{meta_path}: unknown quantiser format {meta.get('format')!r}")
        from safetensors.numpy import load_file

        tensors = load_file(str(weights))
        qcfg = QuantizerConfig(**meta["quantizer"])
        embed = EmbedConfig(**meta["embed"])
        if meta["kind"] == "rqvae":
            import torch

            from cobra_scale.semantic_ids.rqvae import RQVAE

            model = RQVAE(meta["input_dim"], qcfg.hidden_dims, qcfg.latent_dim, qcfg.levels, qcfg.codes)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
            impl: Any = model.to(device).eval()
        else:
            from cobra_scale.semantic_ids.rkmeans import ResidualKMeans

            impl = ResidualKMeans(qcfg.levels, qcfg.codes, qcfg.kmeans_iters, qcfg.seed, qcfg.balance)
            impl.centroids = tensors["centroids"]
        behaviour, text_map = meta.get("behaviour"), None
        if behaviour and behaviour.get("cold") == "text":
            if not (folder / BEHAVIOUR_MAP).is_file():
                raise CobraError(f"{folder} was fitted with behaviour.cold=text but has no {BEHAVIOUR_MAP}")
            text_map = load_file(str(folder / BEHAVIOUR_MAP))["text_map"]
            if text_map.shape != (meta["input_dim"] - int(behaviour["dim"]) + 1, int(behaviour["dim"])):
                raise CobraError(f"{folder / BEHAVIOUR_MAP}: shape {text_map.shape} does not fit the quantiser")
        return cls(meta["kind"], impl, qcfg, meta["input_dim"], device, behaviour, text_map), embed


def fit_quantizer(vectors: np.ndarray, qcfg: QuantizerConfig) -> tuple[Quantizer, np.ndarray, np.ndarray, dict]:
    """Fit the configured quantiser; returns it with the training items' codes and reconstructions."""
    from cobra_scale.devices import pick_device

    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=-1).sum()) if vectors.ndim == 2 else -1
        raise DataError(f"item embeddings must be a finite (N, D) matrix; {bad} row(s) hold NaN/inf")
    if len(vectors) < qcfg.codes:
        raise DataError(f"{len(vectors)} items cannot fill {qcfg.codes} codes per level; lower quantizer.codes")
    start = time.perf_counter()
    if qcfg.kind == "rqvae":
        from cobra_scale.semantic_ids.rqvae import encode_in_batches, fit_rqvae

        device = pick_device(qcfg.device)
        model, fit = fit_rqvae(
            vectors, qcfg.levels, qcfg.codes, qcfg.latent_dim, qcfg.hidden_dims, qcfg.epochs, qcfg.batch_size, qcfg.lr,
            qcfg.weight_decay, qcfg.beta, qcfg.dead_code_steps, qcfg.kmeans_iters, qcfg.seed, device,
        )
        quantizer = Quantizer("rqvae", model, qcfg, vectors.shape[1], device)
        codes, recon = encode_in_batches(model, vectors, device=device)
        report = dict(fit.__dict__)
    else:
        from cobra_scale.semantic_ids.rkmeans import ResidualKMeans

        rk = ResidualKMeans(qcfg.levels, qcfg.codes, qcfg.kmeans_iters, qcfg.seed, qcfg.balance)
        codes = rk.fit_encode(vectors)
        recon = rk.decode(codes)
        quantizer = Quantizer("rkmeans", rk, qcfg, vectors.shape[1])
        report = {}
    report["fit_seconds"] = round(time.perf_counter() - start, 2)
    return quantizer, codes, recon, report


def load_items(path: str) -> pa.Table:
    items = read_table(path)
    for col in ("item_id", "title"):
        if col not in items.column_names:
            raise DataError(f"{path}: items table has no '{col}' column")
    ids = np.asarray(items.column("item_id").fill_null(-1), dtype=np.int64)
    if (ids < 0).any():
        raise DataError(f"{path}: {int((ids < 0).sum())} item(s) with a null or negative item_id")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: {int((counts > 1).sum())} duplicated item_id(s), e.g. {int(uniq[counts > 1][0])}")
    if items.num_rows == 0:
        raise DataError(f"{path}: no items")
    return items


def _behaviour_input(cfg: IdsConfig, quantizer: Quantizer | None, item_ids: np.ndarray, text: np.ndarray, timings: dict) -> dict | None:
    """The behaviour part of the quantiser's input, if any: fitted from ``behaviour.sequences``,
    or, when assigning new items with a saved quantiser, zeros of its size (``behaviour.cold=zeros``)
    or their text's predicted behaviour (``behaviour.cold=text``)."""
    if quantizer is not None:
        saved = quantizer.behaviour
        if not saved:
            return None
        predicted = None if quantizer.text_map is None else predict_behaviour(text, quantizer.text_map)
        return {"vectors": predicted, "weight": float(saved["weight"]), "dim": int(saved["dim"])}
    bcfg = cfg.behaviour
    if not bcfg.sequences or bcfg.weight == 0:
        return None
    from cobra_scale.semantic_ids.behaviour import behaviour_vectors, fill_cold, fit_text_map

    t0 = time.perf_counter()
    vectors, report = behaviour_vectors(bcfg.sequences, item_ids, bcfg.dim, bcfg.window, cfg.quantizer.seed)
    text_map = None
    report = {**report, "weight": bcfg.weight, "cold": bcfg.cold}
    if bcfg.cold == "text":
        text_map = fit_text_map(text, vectors)
        vectors, report["items_filled_from_text"] = fill_cold(text, vectors, text_map)
        log.info("behaviour.cold=text: %d item(s) without co-occurrence get the behaviour predicted from their text", report["items_filled_from_text"])
    timings["behaviour_seconds"] = round(time.perf_counter() - t0, 2)
    return {"vectors": vectors, "weight": bcfg.weight, "dim": bcfg.dim, "report": report, "text_map": text_map}


def _warn_giant_id(diag: dict, behaviour: dict | None) -> None:
    """A warning with the remedy when items without co-occurrence (``behaviour.cold=zeros``) crowd into one giant ID."""
    share = diag["items_per_id"]["max_share_of_items"]
    if not behaviour or behaviour.get("cold", "zeros") != "zeros" or share <= GIANT_ID_SHARE:
        return
    missing = int(behaviour["items"]) - int(behaviour["items_with_behaviour"])
    if missing > 0:
        log.warning(
            "one ID holds %.1f%% of the items (%d) and %d item(s) have no co-occurrence in the behaviour sequences: they share an "
            "empty behaviour half and tend to fall together; behaviour.cold=text gives them the behaviour their text predicts",
            100 * share, diag["items_per_id"]["max"], missing,
        )


def run(cfg: IdsConfig) -> dict:
    from cobra_scale.semantic_ids.embed import embed_items

    out = Path(cfg.out)
    timings: dict[str, float] = {}
    if cfg.quantizer_dir:
        quantizer, embed_cfg = Quantizer.load(cfg.quantizer_dir)
        embed_cfg.cache = cfg.embed.cache
        embed_cfg.backend, embed_cfg.batch_size, embed_cfg.device = cfg.embed.backend, cfg.embed.batch_size, cfg.embed.device
    else:
        quantizer, embed_cfg = None, cfg.embed
    items = load_items(cfg.items)
    t0 = time.perf_counter()
    cache = Path(embed_cfg.cache) if embed_cfg.cache else out / "embeddings.safetensors"
    item_ids, vectors, n_embedded = embed_items(items, embed_cfg, cache)
    timings["embed_seconds"] = round(time.perf_counter() - t0, 2)
    timings["items_embedded"] = n_embedded  # the rest came from the cache
    if n_embedded:
        timings["embedded_items_per_second"] = round(n_embedded / max(timings["embed_seconds"], 1e-9), 1)
    behaviour = _behaviour_input(cfg, quantizer, item_ids, vectors, timings)
    if behaviour is not None:
        vectors = join(vectors, behaviour["vectors"], behaviour["weight"], behaviour["dim"])
    qcfg = cfg.quantizer
    if quantizer is None:
        quantizer, codes, recon, fit_report = fit_quantizer(vectors, qcfg)
        if behaviour is not None:
            quantizer.behaviour, quantizer.text_map = behaviour["report"], behaviour["text_map"]
        quantizer.save(out / "quantizer", EmbedConfig(**{**embed_cfg.__dict__}), fit_report)
        timings["fit_seconds"] = fit_report["fit_seconds"]
    else:
        qcfg = quantizer.cfg
        codes, recon = quantizer.encode(vectors)
    write_table(sids_table(item_ids, codes, qcfg.codes), out / "sids.parquet")
    diag = diagnose(codes, qcfg.codes, vectors, recon)
    diag["kind"] = quantizer.kind
    diag["timings"] = timings
    _warn_giant_id(diag, quantizer.behaviour)
    (out / "diagnostics.json").write_text(json.dumps(diag, indent=2))
    bucket_histogram(codes, qcfg.codes, out / "items_per_id.png", f"{quantizer.kind} {qcfg.levels}x{qcfg.codes}: items per ID ({len(item_ids)} items)")
    save_config(cfg, out)
    print(format_report(diag))
    return {
        "items": len(item_ids),
        "distinct_ids": diag["distinct_ids"],
        "min_level_usage": min(lv["usage"] for lv in diag["per_level"]),
        "max_items_per_id": diag["items_per_id"]["max"],
        **timings,
        "out": str(out),
    }
