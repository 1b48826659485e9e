"""Large-batch evaluation: many inference settings over many users, locally or on Ray Data.

Both paths run :func:`score_batch` — the Recommender's inference and the per-user metrics
— on batches of users; they differ only in who runs it:

* :func:`evaluate_local`: a loop in this process;
* :func:`evaluate_ray`: a Ray Data actor pool (each actor opens the run and its index
  once, then scores batches), in-process Ray on 127.0.0.1 by default or a cluster given
  by ``address`` / ``$RAY_ADDRESS``. The driver only sums per-user values.

Every setting is scored on the same users in one pass, so settings share the model
loading and the data movement. Results are means over users that have a target, with a
confidence half-width (:class:`~cobra_scale.eval.metrics.UserMeans`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cobra_scale.errors import ConfigError, DataError
from cobra_scale.eval.metrics import UserMeans, user_metrics
from cobra_scale.retrieve.recommender import InferenceParams, Recommender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One inference configuration to score, named in the results (e.g. ``cobra|masked``)."""

    name: str
    params: InferenceParams


@dataclass
class SettingsResult:
    means: dict[str, UserMeans]  # setting name -> accumulated per-user values
    users: int  # users scored (with or without a target)
    seconds: float  # wall time of the pass (model loading on workers included)
    per_user: dict[str, np.ndarray] | None = None  # with keep_users: every column of score_batch, (U,) in user order

    def table(self, confidence: float = 0.95) -> dict[str, dict]:
        """``{setting: {"metrics": {name: mean}, "ci": {name: half-width}, "users": n}}``."""
        return {
            name: {"metrics": m.mean(), "ci": m.half_width(confidence), "users": m.count}
            for name, m in self.means.items()
        }


def score_batch(rec: Recommender, history: torch.Tensor, targets: list[np.ndarray], settings: list[Setting], ks: tuple[int, ...], device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Per-user metric columns ``{"<setting>/<metric>": (B,)}`` plus ``has_target`` (B,)."""
    kmax = max(ks)
    sids = rec.diversity_sids if rec.diversity_sids is not None else rec.sids_host
    out: dict[str, np.ndarray] = {}
    history = history.to(device)
    has = None
    # settings differing only in tau/psi share one beam search (Recommender.recommend_many)
    for s, (items, _) in zip(settings, rec.recommend_many(history, kmax, [s.params for s in settings])):
        values, has = user_metrics(items, targets, ks, sids)
        for metric, v in values.items():
            out[f"{s.name}/{metric}"] = v
    out["has_target"] = has if has is not None else np.array([len(t) > 0 for t in targets])
    return out


def diversity_sids(path: str | Path, item_ids: np.ndarray) -> np.ndarray:
    """(N,) int64 sid of each catalogue item (``item_ids``, sorted) from a ``sids.parquet`` or a
    `cobra ids` folder: the IDs that diversity@K counts (``diversity_ids``)."""
    from cobra_scale.data.io import read_table

    path = Path(path)
    if path.is_dir():
        path = path / "sids.parquet"
    if not path.is_file():
        raise DataError(f"diversity_ids: {path} not found (a sids.parquet of `cobra ids`, or its folder)")
    table = read_table(path)
    if not {"item_id", "sid"} <= set(table.column_names):
        raise DataError(f"diversity_ids: {path} has no item_id/sid columns (is it the sids.parquet of `cobra ids`?)")
    if table.num_rows == 0:
        raise DataError(f"diversity_ids: {path} holds no IDs")
    table = table.sort_by("item_id")
    ids, sids = np.asarray(table.column("item_id"), dtype=np.int64), np.asarray(table.column("sid"), dtype=np.int64)
    at = np.searchsorted(ids, item_ids).clip(max=len(ids) - 1)
    missing = ids[at] != item_ids
    if missing.any():
        raise DataError(f"diversity_ids: {int(missing.sum())} catalogue item(s) have no ID in {path}, e.g. {int(item_ids[missing][0])}")
    return sids[at]


def _gather(parts: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Per-user columns of batches that carry their users' ``row`` (0..n-1, any order), as (n,) arrays in row order."""
    if not parts:
        return {}
    rows = np.concatenate([np.asarray(b["row"], dtype=np.int64) for b in parts])
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise RuntimeError(f"per-user results cover {len(np.unique(rows))} distinct rows of {n} users")
    order = np.argsort(rows, kind="stable")
    return {key: np.concatenate([np.asarray(b[key]) for b in parts])[order] for key in parts[0] if key != "row"}


def _accumulate(result: dict[str, UserMeans], columns: dict[str, np.ndarray]) -> None:
    keep = np.asarray(columns["has_target"], dtype=bool)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, v in columns.items():
        if key in ("has_target", "row") or "/" not in key:
            continue
        setting, metric = key.rsplit("/", 1)
        grouped.setdefault(setting, {})[metric] = v
    for setting, values in grouped.items():
        result.setdefault(setting, UserMeans()).update(values, keep)


def evaluate_local(
    rec: Recommender,
    history: torch.Tensor,
    targets: list[np.ndarray],
    settings: list[Setting],
    ks: tuple[int, ...],
    batch_users: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    keep_users: bool = False,
) -> SettingsResult:
    """Score every setting on every user, in this process (``keep_users``: also return the per-user values)."""
    started = time.perf_counter()
    means: dict[str, UserMeans] = {}
    parts: list[dict[str, np.ndarray]] = []
    starts = range(0, len(targets), batch_users)
    for lo in tqdm(starts, desc=f"eval {len(settings)} setting(s)", unit="batch", disable=not progress, leave=False):
        columns = score_batch(rec, history[lo : lo + batch_users], targets[lo : lo + batch_users], settings, ks, device)
        _accumulate(means, columns)
        if keep_users:
            parts.append({**columns, "row": np.arange(lo, lo + len(columns["has_target"]))})
    per_user = _gather(parts, len(targets)) if keep_users else None
    return SettingsResult(means, len(targets), time.perf_counter() - started, per_user)


def pack_users(history: torch.Tensor, targets: list[np.ndarray]) -> np.ndarray:
    """(U, 1 + S + T) int64 rows: ``[row, history (S), targets (T, -1 padded)]``."""
    u, s = history.shape
    t = max((len(x) for x in targets), default=0)
    rows = np.full((u, 1 + s + max(t, 1)), -1, dtype=np.int64)
    rows[:, 0] = np.arange(u)
    rows[:, 1 : 1 + s] = history.numpy()
    for i, x in enumerate(targets):
        rows[i, 1 + s : 1 + s + len(x)] = x
    return rows


def unpack_users(rows: np.ndarray, history_len: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    history = torch.from_numpy(np.ascontiguousarray(rows[:, 1 : 1 + history_len]))
    tail = rows[:, 1 + history_len :]
    return history, [r[r >= 0] for r in tail]


class RecommenderActor:
    """A Ray Data actor: opens the run (and its index) once, then scores batches of users."""

    def __init__(self, run: str, index: str | None, device: str, settings: list[tuple[str, dict]], ks: tuple[int, ...], history_len: int, threads: int,
                 diversity_ids: str | None = None, index_device: str = "follow"):
        from cobra_scale.retrieve.build import load_recommender

        if threads > 0:
            torch.set_num_threads(threads)
        self.rec, catalogue, _, self.device = load_recommender(run, index, device, index_device)
        if diversity_ids:
            self.rec.diversity_sids = diversity_sids(diversity_ids, catalogue.item_ids)
        self.settings = [Setting(name, InferenceParams(**p)) for name, p in settings]
        self.ks, self.history_len = tuple(ks), history_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        history, targets = unpack_users(batch["data"], self.history_len)
        return {**score_batch(self.rec, history, targets, self.settings, self.ks, self.device), "row": batch["data"][:, 0]}


def check_actor_device(device: str, worker_gpus: float) -> None:
    """Refuse the device settings an actor pool would not honour: a GPU device with no GPU reserved (every actor
    would take the node's first GPU unreserved) or GPUs reserved for CPU actors."""
    if device == "cuda" and worker_gpus <= 0:
        raise ConfigError("device=cuda with --workers needs worker_gpus > 0 (each actor's share of a GPU)")
    if device == "cpu" and worker_gpus > 0:
        raise ConfigError("device=cpu with worker_gpus > 0 would reserve GPUs that no actor uses")


def evaluate_ray(
    run: str,
    index: str | None,
    history: torch.Tensor,
    targets: list[np.ndarray],
    settings: list[Setting],
    ks: tuple[int, ...],
    batch_users: int = 256,
    workers: int = 2,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    device: str = "auto",
    address: str | None = None,
    progress: bool = True,
    diversity_ids: str | None = None,
    keep_users: bool = False,
    index_device: str = "follow",
) -> SettingsResult:
    """Score every setting on every user with a Ray Data pool of ``workers`` actors (``keep_users``: also return the
    per-user values, put back in user order from each row's index)."""
    from cobra_scale.distributed import init_ray

    check_actor_device(device, worker_gpus)
    started = time.perf_counter()
    was_running = _ray_running()
    ray = init_ray(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        rows = pack_users(history, targets)
        block = max(batch_users, -(-len(rows) // max(4 * workers, 1)))  # >= 4 blocks per actor
        ds = ray.data.from_numpy([rows[lo : lo + block] for lo in range(0, len(rows), block)])
        threads = max(1, int(worker_cpus))  # GPU actors too: torch's default would take every core of the node
        scored = ds.map_batches(
            RecommenderActor,
            fn_constructor_kwargs={
                "run": str(run),
                "index": str(index) if index else None,
                "device": "cuda" if worker_gpus > 0 else ("cpu" if device == "auto" else device),
                "settings": [(s.name, asdict(s.params)) for s in settings],
                "ks": tuple(ks),
                "history_len": history.shape[1],
                "threads": threads,
                "diversity_ids": str(diversity_ids) if diversity_ids else None,
                "index_device": index_device,
            },
            batch_size=batch_users,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=worker_cpus,
            num_gpus=worker_gpus,
        )
        means: dict[str, UserMeans] = {}
        parts: list[dict[str, np.ndarray]] = []
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            _accumulate(means, batch)
            if keep_users:
                parts.append(batch)
    finally:
        if not was_running:
            ray.shutdown()
    per_user = _gather(parts, len(targets)) if keep_users else None
    return SettingsResult(means, len(targets), time.perf_counter() - started, per_user)


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()
