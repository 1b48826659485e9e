"""Single-process COBRA training: epochs, per-epoch validation, early stopping, checkpoints.

Run folder layout::

    out/config.yaml                      resolved TrainConfig
    out/checkpoints/last/                model.safetensors, optimizer.pt, state.json (resume)
    out/best/                            model.safetensors, config.yaml, state.json (best valid ndcg@10)
    out/history.json, out/curve.png      per-epoch losses and validation metrics

The training step (:func:`train_step`) is the one the distributed launcher wraps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cobra_scale.config import load_config, save_config
from cobra_scale.devices import pick_device, pick_precision, set_tf32, trim_host_memory
from cobra_scale.errors import CobraError, DataError
from cobra_scale.model.beam import PrefixMasks
from cobra_scale.model.cobra import Batch, CobraModel, Losses
from cobra_scale.retrieve.recommender import InferenceParams, Recommender
from cobra_scale.train.configs import InferenceConfig, TrainConfig
from cobra_scale.train.negatives import VectorBank, same_id_candidates
from cobra_scale.train.data import (
    Catalogue,
    EvalSet,
    batch_to,
    cold_item_indices,
    collate,
    length_bucketed_batches,
    load_catalogue,
    load_examples,
    load_tokenizer,
    read_sequences,
    training_windows,
    trim_tokens,
)

log = logging.getLogger(__name__)
TRIM_EVERY_STEPS = 10  # return the heap of variable-shape batches to the OS (devices.trim_host_memory)
POSTFIX_EVERY_STEPS = 20  # the progress bar's loss readout (each read is a GPU sync)


# ----------------------------------------------------------------------------- building


def quantizer_codes(ids_dir: str | Path) -> int:
    meta = Path(ids_dir) / "quantizer" / "quantizer.json"
    if not meta.is_file():
        raise DataError(f"{ids_dir} has no quantizer/quantizer.json (run `cobra ids` first)")
    return int(json.loads(meta.read_text())["quantizer"]["codes"])


def prepare(cfg: TrainConfig) -> tuple[Catalogue, object]:
    """Tokenizer + catalogue; fills ``cfg.model.levels/codes/vocab_size`` from the data."""
    items = cfg.items_path
    if not items.is_file():
        raise DataError(f"items catalogue {items} not found (import a dataset with `cobra data ...`)")
    tokenizer = load_tokenizer()
    codes = quantizer_codes(cfg.ids)
    catalogue = load_catalogue(items, Path(cfg.ids) / "sids.parquet", tokenizer, cfg.model.text_tokens, codes, cfg.dedup_level)
    hold_out_cold_items(catalogue, Path(cfg.data) / "splits" / cfg.split)
    cfg.model.levels = int(catalogue.codes.shape[1])
    cfg.model.codes = codes
    cfg.model.vocab_size = int(tokenizer.vocab_size)
    if cfg.model.item_embedding or cfg.model.successor_embedding:
        cfg.model.catalogue_items = len(catalogue)
    return catalogue, tokenizer


def hold_out_cold_items(catalogue: Catalogue, split: Path) -> None:
    """A cold-start split's ``cold_items.parquet``: those items are never training negatives."""
    cold = cold_item_indices(split, catalogue)
    if cold is None:
        return
    catalogue.hold_out(cold[cold >= 0])
    log.info("%d cold-start items of %s held out of training", int((cold >= 0).sum()), split)


def init_token_embeddings(model: CobraModel) -> None:
    """Token embeddings of the packaged all-MiniLM-L6-v2, PCA-projected to the encoder width."""
    from safetensors.torch import load_file

    from cobra_scale.semantic_ids.embed import resolve_model_path

    weights = load_file(str(Path(resolve_model_path(None)) / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    model.encoder.init_word_embeddings(weights[key])


def init_item_rows(model: CobraModel, catalogue: Catalogue, train_sequences: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """``item_embedding_init=behaviour``: the per-item rows start as co-occurrence vectors.

    Each row is the item's unit PPMI-SVD vector over ``train_sequences`` (zero for an item
    that co-occurs with none), times ``item_embedding_scale`` x the median norm of the
    model's initial text vectors, so the behaviour part starts as loud as the text part.
    """
    from cobra_scale.semantic_ids.behaviour import behaviour_vectors

    dim = model.item_emb.weight.shape[1]
    vectors, report = behaviour_vectors(train_sequences, catalogue.item_ids, dim, cfg.item_embedding_window, cfg.seed)
    scale = cfg.item_embedding_scale * text_vector_norm(model, catalogue, device)
    model.init_item_embedding(torch.from_numpy(vectors) * scale)
    report["row_norm"] = round(scale, 4)
    log.info("item rows from co-occurrence: %d of %d items, norm %.3f", report["items_with_behaviour"], report["items"], scale)
    return report


def init_id_rows(model: CobraModel, catalogue: Catalogue, train_sequences: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """``id_embedding_init=behaviour``: the prefix rows start from co-occurrence.

    The row of each node of the ID trie (a code with its prefix; hashed rows pool their
    nodes) is the direction of the mean unit PPMI-SVD vector of its items over
    ``train_sequences``, times ``id_embedding_scale`` x the median norm of the initial text
    vectors (or 1 without a dense path). The rows are tied into the code heads, so an ID's
    score starts as the similarity of the decoder state to its items' co-occurrence.
    """
    from cobra_scale.semantic_ids.behaviour import behaviour_vectors

    dim = model.prefix_emb[0].weight.shape[1]
    vectors, report = behaviour_vectors(train_sequences, catalogue.item_ids, dim, cfg.item_embedding_window, cfg.seed)
    vectors = torch.from_numpy(vectors)
    has = vectors.abs().sum(dim=1) > 0
    scale = cfg.id_embedding_scale * (text_vector_norm(model, catalogue, device) if model.cfg.use_dense else 1.0)
    codes = catalogue.codes.long()
    packed = torch.zeros(len(codes), dtype=torch.long)
    nodes = []
    for level in range(model.cfg.levels):
        packed = packed * catalogue.codes_per_level + codes[:, level]
        table = model.prefix_emb[level].weight
        rows = model.prefix_rows(level, packed)[has]
        sums = torch.zeros(table.shape, dtype=torch.float32).index_add_(0, rows, vectors[has])
        norms = sums.norm(dim=1, keepdim=True)
        model.init_prefix_embedding(level, torch.where(norms > 0, sums / norms.clamp(min=1e-12), 0.0) * scale)
        nodes.append(int((norms > 0).sum()))
    report.update(row_norm=round(scale, 4), nodes_per_level=nodes)
    log.info("ID rows from co-occurrence: %s nodes per level, norm %.3f", nodes, scale)
    return report


def text_vector_norm(model: CobraModel, catalogue: Catalogue, device: torch.device) -> float:
    """Median norm of the model's text vectors over (up to) the first 4,096 items, dropout off."""
    sample = min(len(catalogue), 4096)
    was_training = model.training
    model.eval()  # dropout off: the norm of the vectors inference sees
    with torch.no_grad():
        text = model.encoder(catalogue.tokens[:sample].to(device), catalogue.token_mask[:sample].to(device)).float()
    model.train(was_training)
    return float(text.norm(dim=1).median())


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def is_id_row(name: str) -> bool:
    """The sparse-ID rows: per-level code embeddings and the ID-trie rows (tied with the code heads)."""
    return name.startswith(("code_emb.", "prefix_emb."))


def is_successor_row(name: str) -> bool:
    """The per-item successor rows (``model.successor_embedding``)."""
    return name.startswith("succ_emb.")


# Optimiser groups by label, in order; the labels are stored in the param groups so that a resume can tell them apart.
GROUP_LABELS = ("decay", "no_decay", "id_rows", "successor_rows")


def optimizer_groups(model: CobraModel, id_rows: bool = False, successor_rows: bool = False) -> tuple[list[str], ...]:
    """Parameter names with and without weight decay (decay on matrices only, not on embeddings, norms, biases,
    nor the repeat offsets, which are logit biases even when stored as a (levels, positions) table).

    ``id_rows``: a further group, the sparse-ID rows (:func:`is_id_row`), taken out of the second, for
    ``id_weight_decay``; ``successor_rows``: another, the successor rows (:func:`is_successor_row`), for
    ``successor_weight_decay``. Groups come in :data:`GROUP_LABELS` order.
    """

    def decays(name: str, p) -> bool:
        return p.ndim >= 2 and "emb" not in name and not name.endswith("repeat.logit")

    def own_group(name: str) -> bool:
        return (id_rows and is_id_row(name)) or (successor_rows and is_successor_row(name))

    names = [n for n, _ in model.named_parameters()]
    decay = [n for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [n for n, p in model.named_parameters() if not decays(n, p) and not own_group(n)]
    groups = [decay, no_decay]
    if id_rows:
        groups.append([n for n in names if is_id_row(n)])
    if successor_rows:
        groups.append([n for n in names if is_successor_row(n)])
    return tuple(groups)


def _labels(id_rows: bool, successor_rows: bool) -> list[str]:
    """The labels of :func:`optimizer_groups`' groups, in its order."""
    return ["decay", "no_decay"] + ["id_rows"] * id_rows + ["successor_rows"] * successor_rows


def make_optimizer(model: CobraModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on embeddings, norms, biases); with ``id_weight_decay`` > 0 a
    further group decays the sparse-ID rows, with ``successor_weight_decay`` > 0 another the successor rows."""
    params = dict(model.named_parameters())
    id_rows = cfg.id_weight_decay > 0
    successor_rows = cfg.successor_weight_decay > 0 and any(is_successor_row(n) for n in params)
    groups = optimizer_groups(model, id_rows=id_rows, successor_rows=successor_rows)
    decays = {"decay": cfg.weight_decay, "no_decay": 0.0, "id_rows": cfg.id_weight_decay, "successor_rows": cfg.successor_weight_decay}
    return torch.optim.AdamW(
        [{"params": [params[n] for n in names], "weight_decay": decays[label], "group": label}
         for names, label in zip(groups, _labels(id_rows, successor_rows))],
        lr=cfg.lr,
        **optimizer_impl_kwargs(cfg.optimizer_impl),
    )


def optimizer_impl_kwargs(impl: str) -> dict:
    """AdamW's ``fused`` / ``foreach`` flags for ``optimizer_impl``. The fused kernel reads and writes each parameter
    and its two moments once per step, where the foreach one makes a pass per operation: on a model's per-item tables
    (1M rows x 128) that is most of a CPU step (measured at 1 thread: 0.25 s against 2.0 s a table, session 39)."""
    return {"fused": True} if impl in ("auto", "fused") else {"foreach": True}


def _saved_labels(param_groups: list[dict]) -> list[str]:
    """The labels of saved param groups; checkpoints before the labels (session 26) had decay, no_decay[, id_rows]."""
    if all("group" in g for g in param_groups):
        return [g["group"] for g in param_groups]
    return list(GROUP_LABELS[: len(param_groups)])


def _groups_of(model: CobraModel, optimizer) -> tuple[list[str], ...]:
    labels = _saved_labels(optimizer.param_groups)
    return optimizer_groups(model, id_rows="id_rows" in labels, successor_rows="successor_rows" in labels)


def optimizer_checkpoint(model: CobraModel, optimizer, scheduler) -> dict:
    """What ``optimizer.pt`` holds: the states and the parameter names they belong to."""
    names = [n for group in _groups_of(model, optimizer) for n in group]
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "param_names": names}


def load_optimizer_checkpoint(model: CobraModel, optimizer, scheduler, saved: dict) -> None:
    """Restore :func:`optimizer_checkpoint`, matching states to parameters by name.

    Optimiser states are stored by parameter position; positions move when the model's
    modules are reorganised, so each state is put back on the parameter of its saved name.
    Checkpoints written before names were saved (session 2) are read in that code's order:
    the top-level temperature came first among the parameters without decay.
    """
    groups_now = _groups_of(model, optimizer)
    current = [n for group in groups_now for n in group]
    names = saved.get("param_names")
    if names is None:
        decay, no_decay = groups_now[:2]
        legacy = [n for n in no_decay if n != "temp.log_temperature"]
        names = decay + (["temp.log_temperature"] + legacy if "temp.log_temperature" in no_decay else legacy)
    names = ["temp.log_temperature" if n == "log_temperature" else n for n in names]
    if sorted(names) != sorted(current):
        raise CobraError("the checkpoint's optimiser state belongs to a different model (parameters differ); start a new run folder or resume=false")
    state = saved["optimizer"]
    was, now = _saved_labels(state["param_groups"]), _saved_labels(optimizer.param_groups)
    if was != now:
        def onoff(labels, label):
            return "on" if label in labels else "off"

        raise CobraError(
            f"the checkpoint's optimiser was built with id_weight_decay {onoff(was, 'id_rows')} and successor_weight_decay "
            f"{onoff(was, 'successor_rows')} (now {onoff(now, 'id_rows')} and {onoff(now, 'successor_rows')}); resume with "
            "the same settings, or start a new run folder / resume=false"
        )
    new_index = {n: i for i, n in enumerate(current)}
    remap = {old: new_index[n] for old, n in enumerate(names)}
    groups = [dict(g) for g in state["param_groups"]]
    start = 0
    for g, names_now, label in zip(groups, groups_now, now):
        g["group"] = label
        g["params"] = list(range(start, start + len(names_now)))
        start += len(names_now)
    for g, current_group in zip(groups, optimizer.param_groups):  # the implementation is this run's, not the saved one's
        g.update({k: current_group[k] for k in ("fused", "foreach") if k in current_group})
    optimizer.load_state_dict({"state": {remap[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups})
    scheduler.load_state_dict(saved["scheduler"])


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps_per_epoch * cfg.epochs))


# ----------------------------------------------------------------------------- step


def train_step(model: CobraModel, batch: Batch, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float, precision: str = "fp32", engine=None,
               bank: VectorBank | None = None, id_candidates: torch.Tensor | None = None, live_rows: bool = False) -> Losses:
    """One optimisation step on one batch (the unit the distributed trainer wraps).

    With a ``bank`` of ``negatives != 0`` the dense loss gets its catalogue term (see
    :mod:`cobra_scale.train.negatives`); with ``id_candidates`` (the batch's unique items'
    rows of :func:`~cobra_scale.train.negatives.same_id_candidates`) its term inside the
    target's ID against the bank. The bank takes the batch's freshly encoded item vectors afterwards.
    With ``live_rows`` (``catalogue_live_rows``) the bank holds text vectors alone: the catalogue
    term's keys add each item's current per-item row, with its gradient.

    With a DeepSpeed ``engine`` (``model`` is then the engine itself) the engine owns the
    backward (loss scaling, gradient accumulation, ZeRO reduce-scatter), clipping
    (``gradient_clipping`` of its config), the optimiser and the scheduler step.
    """
    model.train()
    device_type = batch.seq.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        kwargs = {}
        if bank is not None and bank.negatives:
            keys, ids = bank.sample(batch.item_ids)
            kwargs["bank_keys"], kwargs["bank_ids"] = (model.with_item_rows(keys, ids) if live_rows else keys), ids
        if id_candidates is not None:
            kwargs["id_bank"] = (bank.vectors, id_candidates)
        losses = model(batch, **kwargs)
    if bank is not None and losses.item_vectors is not None:
        bank.update(batch.item_ids, losses.item_text if live_rows else losses.item_vectors)
    if engine is not None:
        engine.backward(losses.total)
        engine.step()
        return losses
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses


# ----------------------------------------------------------------------------- eval / io


def checkpoint_users(valid: EvalSet, cfg: TrainConfig) -> EvalSet:
    """The validation users a run's per-epoch validation (and so its checkpoint choice) scores: ``eval_users`` of
    them drawn with the run's ``seed``. `cobra eval valid_unseen=true` leaves these out."""
    return valid.sample(cfg.eval_users, cfg.seed)


@torch.no_grad()
def encode_catalogue(model: CobraModel, catalogue: Catalogue, device: torch.device, batch: int = 2048, rows: bool = True) -> torch.Tensor:
    """Dense vectors (N, d) of every catalogue item (``rows=False``: their text alone, without the per-item rows)."""
    model.eval()
    out = []
    for start in range(0, len(catalogue), batch):
        mask = catalogue.token_mask[start : start + batch]
        used = int(mask.sum(1).max())
        items = torch.arange(start, min(start + batch, len(catalogue)), device=device)
        out.append(model.encode_items(catalogue.tokens[start : start + batch, :used].to(device), mask[:, :used].to(device), items if rows else None).float())
    return torch.cat(out)


def make_recommender(model: CobraModel, catalogue: Catalogue, device: torch.device, max_per_id: int = 0) -> Recommender:
    vectors = encode_catalogue(model, catalogue, device) if model.cfg.use_dense else None
    return Recommender(model, catalogue.codes.to(device), vectors, max_per_id=max_per_id)


def inference_params(icfg: InferenceConfig, exclude_history: bool = False) -> InferenceParams:
    return InferenceParams(icfg.mode, icfg.beams, icfg.tau, icfg.psi, icfg.normalize, exclude_history, icfg.prior_weight,
                           free_query_weight=icfg.free_query_weight, free_mix_weight=icfg.free_mix_weight,
                           free_mix_candidates=icfg.free_mix_candidates)


def validate_and_keep_best(model: CobraModel, catalogue: Catalogue, valid, params: InferenceParams, device, state: dict, epoch: int,
                           cfg: TrainConfig, out: Path) -> dict[str, float]:
    """Validation metrics of ``model``; saves it to ``out/best`` when valid ndcg@10 improves.

    Updates ``state`` (``best``, ``best_epoch``, ``bad_evals``) for early stopping. Both
    launchers call this, so a run chooses its checkpoint the same way under either.
    """
    from cobra_scale.eval.offline import evaluate

    metrics = evaluate(make_recommender(model, catalogue, device, cfg.inference.max_per_id), valid.history, valid.targets, params, progress=False, device=device)
    score = metrics["ndcg@10"]
    if score > state["best"]:
        state.update(best=score, best_epoch=epoch, bad_evals=0)
        save_weights(model, out / "best")
        save_config(cfg, out / "best")
    else:
        state["bad_evals"] += 1
    return metrics


def save_weights(model: CobraModel, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"format": "cobra_scale.model.v1"})
    os.replace(tmp, folder / "model.safetensors")


def load_weights(model: CobraModel, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise CobraError(f"no model.safetensors in {folder}")
    model.load_state_dict(load_file(str(path)))


def load_run(run: str | Path, device: str = "auto") -> tuple[CobraModel, Catalogue, TrainConfig, torch.device]:
    """The best model of a run folder, its catalogue and config."""
    run = Path(run)
    if not (run / "best" / "model.safetensors").is_file():
        raise CobraError(f"{run} has no best/model.safetensors (train first with `cobra train`)")
    cfg = load_config(TrainConfig, run / "config.yaml")
    catalogue, _ = prepare(cfg)
    dev = torch.device(pick_device(device))
    model = CobraModel(cfg.model).to(dev)
    load_weights(model, run / "best")
    return model.eval(), catalogue, cfg, dev


def plot_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.plot(epochs, [h["train_sparse"] for h in history], label="sparse (CE)")
    a.plot(epochs, [h["train_dense"] for h in history], label="dense (cos softmax)")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss")
    a.legend()
    ev = [h for h in history if "valid" in h]
    for name in ("recall@10", "ndcg@10"):
        b.plot([h["epoch"] for h in ev], [h["valid"][name] for h in ev], marker="o", label=f"valid {name}")
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- run


def run(cfg: TrainConfig) -> dict:
    if cfg.launcher == "ray":
        from cobra_scale.train.ray_trainer import run as run_distributed

        return run_distributed(cfg)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(pick_device(cfg.device))
    precision = pick_precision(cfg.precision, device.type)
    set_tf32(cfg.tf32, device.type)
    out = Path(cfg.out)
    catalogue, _ = prepare(cfg)
    split = Path(cfg.data) / "splits" / cfg.split
    for part in ("train", "valid"):
        if not (split / part).exists():
            raise DataError(f"{split / part} not found (make the split with `cobra data split` or `cobra data amazon`)")
    windows = training_windows(read_sequences(split / "train", catalogue), cfg.model.max_items)
    if not windows:
        raise DataError(f"{split / 'train'} holds no sequence of 2+ items")
    valid = checkpoint_users(load_examples(split / "valid", catalogue, cfg.model.max_items - 1), cfg)
    save_config(cfg, out)

    model = CobraModel(cfg.model).to(device)
    model.dense_loss_impl = cfg.dense_loss_impl
    if cfg.model.constrained_codes:
        model.code_masks = PrefixMasks(catalogue.codes.numpy(), catalogue.codes_per_level, device)
    if cfg.init_embeddings:
        init_token_embeddings(model)
    last = out / "checkpoints" / "last"
    resuming = cfg.resume and (last / "state.json").is_file()
    if cfg.item_embedding_init == "behaviour" and not resuming:  # a resumed run loads its trained rows
        init_item_rows(model, catalogue, split / "train", cfg, device)
    if cfg.id_embedding_init == "behaviour" and not resuming:
        init_id_rows(model, catalogue, split / "train", cfg, device)
    optimizer = make_optimizer(model, cfg)
    ema = make_ema(model, cfg.ema_decay)
    lengths = np.array([len(w) for w in windows])
    steps_per_epoch = len(epoch_batches(lengths, cfg, 0))
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "history": []}
    if resuming:
        load_weights(model, last)
        load_optimizer_checkpoint(model, optimizer, scheduler, torch.load(last / "optimizer.pt", map_location=device, weights_only=True))
        state = json.loads((last / "state.json").read_text())
        if ema is not None:
            load_ema(ema, last)
        if not load_rng(last, device):
            log.warning("%s has no rng.pt (saved by an older version): dropout restarts from the seed, so this run "
                        "will not match an uninterrupted one exactly", last)
        log.info("resumed from %s at epoch %d (step %d)", last, state["epoch"], state["step"])
    log.info(
        "%d training windows (%d targets), %d steps/epoch, %d valid users, %.2fM parameters, dense loss: %s",
        len(windows), sum(len(w) - 1 for w in windows), steps_per_epoch, len(valid.targets),
        sum(p.numel() for p in model.parameters()) / 1e6, _dense_impl_name(cfg.dense_loss_impl, device),
    )
    params = inference_params(cfg.inference)
    bank = None
    stop_reason = "epochs"
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        epoch_started = time.perf_counter()
        batches = epoch_batches(lengths, cfg, epoch)
        rng = np.random.default_rng([cfg.seed, epoch])
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # total, sparse, dense: summed on the device, read once an epoch
        if (cfg.catalogue_negatives or cfg.id_bank_negatives) and cfg.model.use_dense:  # each epoch the bank starts from the current weights
            vectors = encode_catalogue(model, catalogue, device, rows=not cfg.catalogue_live_rows)
            if bank is None:
                bank = VectorBank(vectors, cfg.catalogue_negatives, catalogue.held_out)
                if cfg.catalogue_negatives:
                    log.info("dense loss: %s catalogue negatives per step from a bank of %d item vectors%s",
                             "all" if cfg.catalogue_negatives < 0 else cfg.catalogue_negatives, len(bank),
                             " (text; each key adds its item's live row)" if cfg.catalogue_live_rows else "")
                if cfg.id_bank_negatives:
                    log.info("dense loss: up to %d items of the target's own ID per prediction from a bank of %d item vectors",
                             cfg.id_bank_negatives, len(bank))
            else:
                bank.refresh(vectors)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", unit="step", leave=False)
        for i in bar:
            chunk = [windows[j] for j in batches[i]]
            batch = batch_to(trim_tokens(collate(chunk, catalogue, cfg.dense_negatives, rng)), device)
            id_candidates = None
            if cfg.id_bank_negatives:  # the config requires the dense path with it
                cand = same_id_candidates(catalogue.id_buckets(), batch.item_ids.cpu().numpy(), cfg.id_bank_negatives, rng)
                id_candidates = torch.from_numpy(cand).to(device)
            losses = train_step(model, batch, optimizer, scheduler, cfg.grad_clip, precision, bank=bank, id_candidates=id_candidates,
                                live_rows=cfg.catalogue_live_rows)
            if ema is not None:
                ema.update_parameters(model)
            sums += torch.stack([losses.total.detach(), losses.sparse.detach(), losses.dense.detach()]).double()
            state["step"] += 1
            if state["step"] % TRIM_EVERY_STEPS == 0:
                trim_host_memory()
            if (i + 1) % POSTFIX_EVERY_STEPS == 0 or i + 1 == steps_per_epoch:  # reading a loss waits for the GPU: not every step
                bar.set_postfix(sparse=f"{float(losses.sparse.detach()):.3f}", dense=f"{float(losses.dense.detach()):.3f}")
        means = dict(zip(("total", "sparse", "dense"), (sums / steps_per_epoch).tolist()))
        record = {"epoch": epoch, "step": state["step"], **{f"train_{k}": v for k, v in means.items()},
                  "temperature": float(model.temperature.detach()), "elapsed_s": round(time.perf_counter() - started, 1),
                  **repeat_offsets(model)}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            record["valid"] = validate_and_keep_best(model if ema is None else ema.module, catalogue, valid, params, device, state, epoch, cfg, out)
        state["epoch"] = epoch
        state["history"].append(record)
        _save_last(model, optimizer, scheduler, state, last, ema)
        log.info("epoch %d: %s", epoch, _fmt(record))
        if state["bad_evals"] >= cfg.patience:
            stop_reason = f"early stop (no improvement in {cfg.patience} validations)"
            break
        now = time.perf_counter()
        budget_stop = time_budget_stop(cfg.max_minutes, now - started, now - epoch_started)
        if budget_stop:
            stop_reason = budget_stop
            break
    (out / "history.json").write_text(json.dumps(state["history"], indent=2))
    plot_curve(state["history"], out / "curve.png")
    (out / "best" / "state.json").write_text(json.dumps({"epoch": state["best_epoch"], "valid_ndcg@10": state["best"]}))
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return {
        "epochs": state["epoch"],
        "stopped_by": stop_reason,
        "best_epoch": state["best_epoch"],
        **{f"valid_{k}": round(v, 4) for k, v in best.get("valid", {}).items()},
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "out": str(out),
    }


def next_epoch_fits(elapsed_s: float, last_epoch_s: float, budget_s: float) -> bool:
    """Whether an epoch as long as the last one (training + validation) ends within the budget.

    Checked at epoch ends, so a run stops *before* the epoch that would overshoot ``max_minutes``
    rather than after it (which overshot by up to an epoch)."""
    return elapsed_s + last_epoch_s <= budget_s


def time_budget_stop(max_minutes: float, elapsed_s: float, last_epoch_s: float) -> str | None:
    """The stop reason when ``max_minutes`` (0 = none) leaves no room for another epoch like the last, else None."""
    budget_s = max_minutes * 60 if max_minutes else float("inf")
    if next_epoch_fits(elapsed_s, last_epoch_s, budget_s):
        return None
    return f"time budget of {max_minutes} min (another epoch of ~{last_epoch_s / 60:.1f} min would end past it)"


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, epoch: int) -> list[np.ndarray]:
    """The window indices of each step of ``epoch`` (seeded; the same on resume)."""
    rng = np.random.default_rng(cfg.seed + epoch)
    if cfg.length_buckets:
        return length_bucketed_batches(lengths, cfg.batch_size, rng)
    order = rng.permutation(len(lengths))
    return [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def make_ema(model: CobraModel, decay: float):
    """An exponential moving average of ``model``'s parameters (``torch.optim.swa_utils.AveragedModel``), or None at decay 0.

    Its first update copies the weights; each later one moves the average ``1 - decay`` of the way to them.
    Buffers are not averaged (the model's are constant index tensors)."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def load_ema(ema, folder: Path) -> None:
    """Restore the average saved beside a resumable checkpoint (ema.safetensors, with its update count)."""
    from safetensors.torch import load_file

    path = folder / "ema.safetensors"
    if not path.is_file():
        raise CobraError(f"{folder} has no ema.safetensors: the run was started without ema_decay (set ema_decay=0 or use a new out)")
    ema.load_state_dict(load_file(str(path)))


def rng_state() -> dict:
    """torch's generator states (CPU, and every CUDA device when present): with them a resumed run draws the same
    dropout masks as an uninterrupted one (batch order and negatives are seeded per epoch already)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(saved: dict | torch.Tensor, device: torch.device) -> None:
    """Set the states ``rng_state`` returned (a bare tensor, as older distributed checkpoints hold, is the CPU state)."""
    if isinstance(saved, torch.Tensor):
        saved = {"cpu": saved}
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and device.type == "cuda" and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def load_rng(folder: Path, device: torch.device) -> bool:
    """Restore the states saved in ``folder/rng.pt``; False when the checkpoint has none."""
    path = folder / "rng.pt"
    if not path.is_file():
        return False
    restore_rng(torch.load(path, map_location="cpu", weights_only=True), device)
    return True


def _save_last(model, optimizer, scheduler, state: dict, folder: Path, ema=None) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(".last.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer_checkpoint(model, optimizer, scheduler), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _dense_impl_name(impl: str, device: torch.device) -> str:
    from cobra_kernels import resolve_impl

    return resolve_impl(impl, device)


def repeat_offsets(model) -> dict:
    """The learned repeat offsets of a model, for the training history: {"repeat_offsets": [...], "dense_repeat_offsets": [...]}
    (each present only when the model has that bias)."""
    out = {}
    for key, module in (("repeat_offsets", getattr(model, "repeat", None)), ("dense_repeat_offsets", getattr(model, "dense_repeat", None))):
        if module is not None:
            out[key] = [round(float(v), 4) for v in module.logit.detach().float().reshape(-1)]
    return out


def _fmt(record: dict) -> str:
    parts = [f"sparse {record['train_sparse']:.3f}", f"dense {record['train_dense']:.3f}", f"T {record['temperature']:.3f}"]
    if "dense_repeat_offsets" in record:
        parts.append("dense repeat " + "/".join(f"{v:+.2f}" for v in record["dense_repeat_offsets"]))
    if "valid" in record:
        parts += [f"valid {k} {v:.4f}" for k, v in record["valid"].items()]
    return ", ".join(parts)
