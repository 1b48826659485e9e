"""SASRec (Kang & McAuley, 2018) trained with full-softmax cross-entropy: the ID baseline.

The model: item-ID embeddings (scaled by sqrt(d)) + learned positional embeddings,
dropout, ``blocks`` causal self-attention blocks (pre-LN by default, post-LN optional),
and tied output logits ``hidden @ item_embedding.T`` over the whole catalogue.

Training follows the benchmark protocol (``../shared/datasets/amazon-beauty/README.md``):
every prefix of a user's training sequence is an example whose history is the last
``max_history`` items. Causal attention trains all prefixes of a window at once: a
training sequence is cut, from its end, into windows of ``max_history + 1`` items
(consecutive windows share one item), so every target sees up to ``max_history`` history
items; the loss is the full-softmax cross-entropy over all items at every position.
Batches group windows of similar length (:func:`length_bucketed_batches`) and drop the
all-padding columns: most Beauty sequences are short, so this cuts the transformer's work
about threefold; the full-catalogue logits then dominate a step.

Evaluation ranks the full catalogue (the padding index is never a candidate) for every
validation/test row, from its ``history`` (truncated to the last ``max_history``), and
reports Recall@K / NDCG@K both as the papers do (history not masked) and with the
row's history items masked from the ranking. The epoch is chosen on validation only.

Item ids are mapped to embedding rows through the catalogue (``items.parquet``): the
sorted ids get indices ``1..N``; index 0 is the padding.

Outputs in ``out/``: ``model.safetensors`` (the best epoch's weights plus the catalogue
ids under ``catalogue.item_ids``), ``model.json`` (architecture), ``results.json`` and
``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cobra_scale.baselines.configs import SASRecConfig
from cobra_scale.config import save_config
from cobra_scale.data.io import read_table
from cobra_scale.errors import DataError
from cobra_scale.devices import pick_device
from cobra_scale.eval.metrics import MetricAccumulator, topk_with_exclusion

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
RESULTS = "results.json"
CATALOGUE_KEY = "catalogue.item_ids"


# ----------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); allowed (B, 1, T, T) bool, True = query may attend to key."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float, norm: str):
        super().__init__()
        self.pre = norm == "pre"
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = x + self.drop(self.attn(self.ln1(x), allowed))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, allowed)))
        return self.ln2(x + self.drop(self.ffn(x)))


@dataclass
class SASRecShape:
    """The architecture (saved as model.json next to the weights)."""

    n_items: int
    d_model: int = 128
    heads: int = 2
    blocks: int = 2
    ffn_dim: int = 128
    dropout: float = 0.5
    max_len: int = 20
    norm: str = "pre"
    scale_embeddings: bool = True  # item embeddings * sqrt(d_model) at the input, as in SASRec


class SASRec(nn.Module):
    """Causal transformer over item indices (1..n_items, 0 = padding) with tied output logits."""

    def __init__(self, shape: SASRecShape):
        super().__init__()
        self.shape = shape
        d = shape.d_model
        self.item_emb = nn.Embedding(shape.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(shape.max_len, d)
        self.emb_drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(d, shape.heads, shape.ffn_dim, shape.dropout, shape.norm) for _ in range(shape.blocks))
        self.final_ln = nn.LayerNorm(d) if shape.norm == "pre" else nn.Identity()
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) item indices, left-padded with 0 -> hidden states (B, T, C).

        Position t sees items at positions <= t only; padding positions are never attended
        to (a padding query attends to itself so that no softmax row is empty).
        """
        b, t = idx.shape
        if t > self.shape.max_len:
            raise ValueError(f"sequence length {t} > max_len {self.shape.max_len}")
        real = idx > 0  # (B, T)
        # left padding: the last position of the window is always position max_len - 1
        pos = torch.arange(self.shape.max_len - t, self.shape.max_len, device=idx.device)
        scale = math.sqrt(self.shape.d_model) if self.shape.scale_embeddings else 1.0
        x = self.item_emb(idx) * scale + self.pos_emb(pos)  # (B, T, C)
        x = self.emb_drop(x) * real.unsqueeze(-1)
        eye = torch.eye(t, dtype=torch.bool, device=idx.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        allowed = (causal & (real.unsqueeze(1) | eye)).unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_ln(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., C) -> logits (..., n_items) over item indices 1..n_items (column j = index j+1)."""
        return hidden @ self.item_emb.weight[1:].T


# ----------------------------------------------------------------------------- data


class Catalogue:
    """Item id <-> embedding index: sorted catalogue ids get indices 1..N (0 = padding)."""

    def __init__(self, item_ids: np.ndarray):
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        if len(ids) != len(item_ids):
            raise DataError(f"items: {len(item_ids) - len(ids)} duplicate item ids")
        self.item_ids = ids  # (N,) index i+1 <-> item_ids[i]

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_index(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Indices (1..N) of ``ids``; raises DataError naming ``what`` for ids not in the catalogue."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, ids)
        ok = (pos < len(self.item_ids)) & (self.item_ids[np.minimum(pos, len(self.item_ids) - 1)] == ids)
        if not ok.all():
            bad = ids[~ok]
            raise DataError(f"{what}: {len(bad)} item ids are not in items.parquet (e.g. {int(bad[0])})")
        return pos + 1


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(flat values, offsets)`` of a list<int64> column."""
    arr = table.column(name).combine_chunks()
    if arr.null_count:
        raise DataError(f"column '{name}' has {arr.null_count} null lists")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values, dtype=np.int64)[offsets[0] : offsets[-1]] if len(arr.values) else np.zeros(0, np.int64)
    return values, offsets - offsets[0]


def training_windows(values: np.ndarray, offsets: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each training sequence, from its end, into windows of ``max_history + 1`` items.

    Args:
        values, offsets: the sequences (item indices) as flat values + row offsets.
        max_history: window inputs length T.

    Returns:
        ``(inputs, targets)``, both (W, T) int64, left-padded with 0: ``targets[w, t]`` is
        the item after ``inputs[w, t]``. Consecutive windows of one sequence overlap by one
        item, so every item but each sequence's first is a target exactly once.

        >>> training_windows(np.array([1, 2, 3, 4]), np.array([0, 4]), max_history=2)[0].tolist()
        [[0, 1], [2, 3]]
    """
    width = max_history + 1
    inputs, targets = [], []
    for u in range(len(offsets) - 1):
        seq = values[offsets[u] : offsets[u + 1]]
        end = len(seq)
        while end >= 2:
            window = seq[max(0, end - width) : end]
            inp = np.zeros(max_history, np.int64)
            tgt = np.zeros(max_history, np.int64)
            inp[max_history - len(window) + 1 :] = window[:-1]
            tgt[max_history - len(window) + 1 :] = window[1:]
            inputs.append(inp)
            targets.append(tgt)
            end -= max_history
    if not inputs:
        raise DataError("no training sequence has 2 or more items")
    return np.stack(inputs), np.stack(targets)


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator, chunk_batches: int = 50) -> list[torch.Tensor]:
    """Shuffled batches of row indices whose rows have similar lengths.

    Rows are shuffled, cut into chunks of ``chunk_batches`` batches, sorted by length
    inside each chunk and cut into batches; the batch order is shuffled again. Batches of
    similar lengths waste little compute on padding, and the chunking keeps them random.
    """
    perm = torch.randperm(len(lengths), generator=gen)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(perm), chunk):
        rows = perm[start : start + chunk]
        rows = rows[torch.argsort(lengths[rows], stable=True)]
        batches.extend(rows.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in order]


def padded_histories(values: np.ndarray, offsets: np.ndarray, max_history: int) -> np.ndarray:
    """(U, max_history) item indices: each row's last ``max_history`` items, left-padded with 0."""
    n = len(offsets) - 1
    out = np.zeros((n, max_history), np.int64)
    lengths = np.minimum(np.diff(offsets), max_history)
    for u in range(n):
        if lengths[u]:
            out[u, max_history - lengths[u] :] = values[offsets[u + 1] - lengths[u] : offsets[u + 1]]
    return out


@dataclass
class EvalSet:
    histories: torch.Tensor  # (U, T) item indices, left-padded with 0
    targets: list  # U arrays of raw item ids


def load_eval_set(folder: Path, catalogue: Catalogue, max_history: int) -> EvalSet:
    table = read_table(folder, columns=["history", "targets"])
    values, offsets = _list_column(table, "history")
    hist = padded_histories(catalogue.to_index(values, f"{folder} history"), offsets, max_history)
    tvals, toffs = _list_column(table, "targets")
    catalogue.to_index(tvals, f"{folder} targets")  # only checks: targets outside the catalogue can never be hit
    targets = np.split(tvals, toffs[1:-1]) if table.num_rows else []
    return EvalSet(torch.from_numpy(hist), targets)


# ----------------------------------------------------------------------------- train / eval


@torch.no_grad()
def evaluate(model: SASRec, data: EvalSet, catalogue_ids: np.ndarray, ks: Sequence[int], batch_size: int, device: str, desc: str = "eval", progress: bool = True) -> dict[str, dict[str, float]]:
    """Full-catalogue ranking metrics of ``data``: ``{"unmasked": {...}, "masked": {...}}``.

    ``masked`` removes each row's history items (the padded history row itself) from its ranking.
    """
    model.eval()
    kmax = max(ks)
    accs = {"unmasked": MetricAccumulator(ks), "masked": MetricAccumulator(ks)}
    n = data.histories.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False, **_tqdm_kwargs()):
        hist = data.histories[start : start + batch_size]
        width = max(int((hist > 0).sum(dim=1).max()), 1)  # left padding: drop all-padding columns
        hist = hist[:, -width:].to(device)
        targets = data.targets[start : start + batch_size]
        scores = model.item_logits(model(hist)[:, -1])  # (B, N): column j = item index j+1
        top = topk_with_exclusion(scores, kmax).cpu().numpy()
        accs["unmasked"].update(catalogue_ids[top], targets)
        top_m = topk_with_exclusion(scores, kmax, hist - 1, inplace=True).cpu().numpy()  # pads -> -1: ignored
        accs["masked"].update(catalogue_ids[top_m], targets)
    return {name: acc.result() for name, acc in accs.items()}


def _tqdm_kwargs() -> dict[str, Any]:
    # a log file gets a line every 30 s instead of a carriage-return stream
    return {} if sys.stderr.isatty() else {"mininterval": 30.0}


def save_model(model: SASRec, catalogue_ids: np.ndarray, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors[CATALOGUE_KEY] = torch.from_numpy(np.ascontiguousarray(catalogue_ids))
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    (out / MODEL_JSON).write_text(json.dumps(model.shape.__dict__, indent=2) + "\n")


def load_model(folder: str | os.PathLike, device: str = "cpu") -> tuple[SASRec, np.ndarray]:
    """A saved SASRec (eval mode) and its catalogue ids (index i+1 <-> ids[i])."""
    from safetensors.torch import load_file

    folder = Path(folder)
    shape = SASRecShape(**json.loads((folder / MODEL_JSON).read_text()))
    tensors = load_file(str(folder / WEIGHTS))
    ids = tensors.pop(CATALOGUE_KEY).numpy()
    model = SASRec(shape)
    model.load_state_dict(tensors)
    return model.to(device).eval(), ids


def run(cfg: SASRecConfig) -> dict:
    """Train SASRec on ``<data>/splits/<split>/train``, pick the epoch on ``valid``, test it."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    data, split = Path(cfg.data), Path(cfg.data) / "splits" / cfg.split
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    ks = [int(k) for k in cfg.ks]

    catalogue = Catalogue(read_table(data / "items.parquet", columns=["item_id"]).column("item_id").to_numpy())
    train_table = read_table(split / "train", columns=["item_ids"])
    values, offsets = _list_column(train_table, "item_ids")
    inputs, targets = training_windows(catalogue.to_index(values, f"{split / 'train'} item_ids"), offsets, cfg.max_history)
    valid = load_eval_set(split / "valid", catalogue, cfg.max_history)
    test = load_eval_set(split / "test", catalogue, cfg.max_history)
    n_targets = int((targets > 0).sum())
    log.info("catalogue %d items; train %d sequences -> %d windows, %d targets; valid %d, test %d rows",
             len(catalogue), train_table.num_rows, len(inputs), n_targets, len(valid.targets), len(test.targets))

    shape = SASRecShape(len(catalogue), cfg.d_model, cfg.heads, cfg.blocks, cfg.ffn_dim or cfg.d_model, cfg.dropout, cfg.max_history, cfg.norm, cfg.scale_embeddings)
    model = SASRec(shape).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs_t, targets_t = torch.from_numpy(inputs), torch.from_numpy(targets)
    lengths = torch.from_numpy((targets > 0).sum(axis=1))
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes > 0 else math.inf
    t_train = time.perf_counter()

    history: list[dict] = []
    best: dict[str, Any] | None = None
    since_best, stop_reason, epoch = 0, "epochs", 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = length_bucketed_batches(lengths, cfg.batch_size, gen)
        loss_sum, loss_n, out_of_time = 0.0, 0, False
        t_epoch = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="step", disable=not cfg.progress, leave=False, **_tqdm_kwargs())
        for rows in bar:
            width = int(lengths[rows].max())  # left padding: drop the all-padding columns
            inp, tgt = inputs_t[rows, -width:].to(device), targets_t[rows, -width:].to(device)
            hidden = model(inp)  # (B, T, C)
            sel = tgt > 0
            logits = model.item_logits(hidden[sel])  # (targets in batch, N)
            loss = F.cross_entropy(logits, tgt[sel] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_sel = int(sel.sum())
            loss_sum += float(loss.detach()) * n_sel
            loss_n += n_sel
            if cfg.progress:
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", refresh=False)
            if time.perf_counter() - t_train > budget_s:
                out_of_time = True
                break
        bar.close()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1), "epoch_s": round(time.perf_counter() - t_epoch, 2), "complete": not out_of_time}
        if out_of_time and best is not None:
            history.append(record)
            stop_reason = "max_minutes"
            break
        if epoch % cfg.eval_every == 0 or out_of_time or epoch == cfg.epochs:
            metrics = evaluate(model, valid, catalogue.item_ids, ks, cfg.eval_batch_size, device, desc=f"valid {epoch}", progress=cfg.progress)
            record["valid"] = metrics
            score = metrics["unmasked"][cfg.select_metric]
            improved = best is None or score > best["score"]
            if improved:
                best = {"epoch": epoch, "score": score, "valid": metrics}
                save_model(model, catalogue.item_ids, out)
                since_best = 0
            else:
                since_best += 1
            log.info("epoch %d loss %.4f (%.1fs) valid R@10 %.4f N@10 %.4f%s", epoch, record["train_loss"], record["epoch_s"],
                     metrics["unmasked"].get("recall@10", float("nan")), metrics["unmasked"].get("ndcg@10", float("nan")),
                     " *" if improved else "")
        history.append(record)
        if out_of_time:
            stop_reason = "max_minutes"
            break
        if since_best >= cfg.patience:
            stop_reason = "patience"
            break
    train_s = time.perf_counter() - t_train

    assert best is not None
    model, _ = load_model(out, device)
    test_metrics = evaluate(model, test, catalogue.item_ids, ks, cfg.eval_batch_size, device, desc="test", progress=cfg.progress)
    results = {
        "model": "sasrec-ce",
        "data": str(data),
        "split": cfg.split,
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "stop_reason": stop_reason,
        "select_metric": f"valid unmasked {cfg.select_metric}",
        "valid": best["valid"],
        "test": test_metrics,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "params": n_params,
        "n_items": len(catalogue),
        "train_windows": len(inputs),
        "train_targets": n_targets,
        "device": device,
        "threads": torch.get_num_threads(),
        "history": history,
    }
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    fmt = lambda m: " ".join(f"{k}={v:.4f}" for k, v in m.items())  # noqa: E731
    return {
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "stop_reason": stop_reason,
        "valid": fmt(best["valid"]["unmasked"]),
        "test": fmt(test_metrics["unmasked"]),
        "test_history_masked": fmt(test_metrics["masked"]),
        "train_minutes": round(train_s / 60, 1),
        "results": str(out / RESULTS),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cobra_scale.baselines.sasrec [-c YAML] [key=value ...]`` (same as ``cobra baseline sasrec``)."""
    import argparse

    from cobra_scale.config import load_config
    from cobra_scale.errors import CobraError

    parser = argparse.ArgumentParser(prog="python -m cobra_scale.baselines.sasrec", description=SASRecConfig.__doc__)
    parser.add_argument("--config", "-c", metavar="YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        summary = run(load_config(SASRecConfig, args.config, dotlist=args.overrides))
    except CobraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
