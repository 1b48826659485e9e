"""Distributed COBRA training: Ray Train workers, each running :func:`train_step` under
DeepSpeed ZeRO, fed by Ray Data (``cobra train launcher=ray``).

The driver (:func:`run`) tokenises the catalogue once, broadcasts it through the object
store, builds the streaming window dataset (``streaming.py``) and starts a
``TorchTrainer``. Each worker (:func:`train_loop_per_worker`) builds the same model and
optimiser as the local trainer, wraps them with ``deepspeed.initialize`` and runs the
local trainer's step on the batches of its shard.

Checkpoint folder (one per ``ray.train.report``; Ray Train merges the ranks' files)::

    ds/...               DeepSpeed checkpoint: weights, this rank's ZeRO optimiser partition, scheduler
    latest               DeepSpeed's tag file
    rng/rank_<r>.pt      each rank's torch RNG states (CPU, and CUDA on GPU workers: dropout), so a resume replays exactly
    state.json           epoch, optimiser step, batches consumed in the epoch, history, best

Run folder (``out``): what the local trainer writes (``config.yaml``, ``best/``,
``history.json``, ``curve.png``) plus ``final/model.safetensors`` (the weights at the
end), ``metrics.jsonl`` (per optimiser step, rank 0), ``tensorboard/``, ``ray/train/``
(Ray Train storage: the checkpoints), ``workers/rank_<r>.pid``.

Resume: a run started again with the same ``out`` (and ``resume=true``) continues from its
latest checkpoint: weights, optimiser, scheduler, step, RNG and data position (the
streaming split is deterministic, so the batches already consumed are skipped). A worker
that dies mid-run makes Ray Train restart the worker group from that checkpoint, up to
``distributed.max_failures`` times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cobra_scale.config import save_config
from cobra_scale.devices import pick_precision, set_tf32, trim_host_memory
from cobra_scale.errors import CobraError, ConfigError, DataError
from cobra_scale.train.configs import TrainConfig

log = logging.getLogger(__name__)

RUN_NAME = "train"  # Ray Train run name under the storage path: a rerun with the same name resumes
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-folder) inside every checkpoint
REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


# ----------------------------------------------------------------------------- driver


def resolve_ds_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config of ``cfg.distributed.deepspeed`` with its ``"auto"`` batch fields filled.

    ``batch_size`` is the global batch (windows per optimiser step), as in the local
    trainer; each worker's micro-batch is ``batch_size / (workers * grad_accum)``.
    """
    dcfg = cfg.distributed
    path = Path(dcfg.deepspeed)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {dcfg.deepspeed} not found (see configs/deepspeed/)")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    if not isinstance(conf, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    if "optimizer" in conf or "scheduler" in conf:
        raise ConfigError(f"{path}: remove 'optimizer'/'scheduler'; the trainer passes its own AdamW and schedule (lr, warmup_steps)")
    split = dcfg.workers * dcfg.grad_accum
    if cfg.batch_size % split:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by workers x grad_accum = {split}")
    wanted = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // split,
        "gradient_accumulation_steps": dcfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in wanted.items():
        if conf.get(key, "auto") == "auto":
            conf[key] = value
        elif float(conf[key]) != float(value):
            raise ConfigError(f"{path}: {key}={conf[key]} contradicts the trainer config ({value}); set it to \"auto\"")
    stage = int(conf.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {stage}")
    for half in ("bf16", "fp16"):
        if conf.get(half, {}).get("enabled") == "auto":
            conf[half]["enabled"] = False  # precision=bf16 autocasts, like the local trainer
    return conf


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def storage_root(cfg: TrainConfig) -> Path:
    return Path(cfg.distributed.storage).resolve() if cfg.distributed.storage else Path(cfg.out).resolve() / "ray"


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """A copy with absolute paths: workers may run in another directory."""
    paths = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("data", "ids", "out", "items") if getattr(cfg, k)}
    return dataclasses.replace(cfg, **paths)


def run(cfg: TrainConfig) -> dict:
    """Train on Ray Train workers; returns the same summary as the local trainer."""
    from cobra_scale.distributed import init_ray
    from cobra_scale.train.streaming import catalogue_arrays, count_windows, window_dataset
    from cobra_scale.train.trainer import prepare

    started = time.time()
    dcfg = cfg.distributed
    ds_config = resolve_ds_config(cfg)
    catalogue, _ = prepare(cfg)
    split = Path(cfg.data) / "splits" / cfg.split
    for part in ("train", "valid"):
        if not (split / part).exists():
            raise DataError(f"{split / part} not found (make the split with `cobra data split` or `cobra data amazon`)")
    users, windows = count_windows(split / "train", cfg.model.max_items)
    if not windows:
        raise DataError(f"{split / 'train'} holds no sequence of 2+ items")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    micro_per_epoch = math.ceil(windows // dcfg.workers / micro)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / dcfg.grad_accum))
    out = Path(cfg.out)
    storage = storage_root(cfg)
    if not cfg.resume:
        shutil.rmtree(storage / RUN_NAME, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out)
    log.info(
        "%d users, %d training windows; %d workers x micro-batch %d x grad_accum %d = batch %d; ~%d steps/epoch; ZeRO stage %d",
        users, windows, dcfg.workers, micro, dcfg.grad_accum, cfg.batch_size, steps_per_epoch, zero_stage(ds_config),
    )

    ray = init_ray(dcfg.address, log_to_driver=True, dashboard=True)  # the state API, for Ray Train's placement-group cleaner
    from ray.data import DataContext, ExecutionOptions, ExecutionResources
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    DataContext.get_current().enable_progress_bars = False  # the workers print one progress line
    wcfg = _absolute(cfg)
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if k in os.environ}
    if not dcfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    resources = {"CPU": dcfg.cpus_per_worker, **({"GPU": 1} if dcfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": wcfg,
            "ds_config": ds_config,
            "catalogue": ray.put(catalogue_arrays(catalogue)),
            "steps_per_epoch": steps_per_epoch,
            "started": started,
        },
        scaling_config=ScalingConfig(num_workers=dcfg.workers, use_gpu=dcfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=dcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=dcfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": window_dataset(split / "train", catalogue.item_ids, cfg.model.max_items, cfg.seed, block_bytes=dcfg.block_mb * 2**20)},
        # Order preserved: the split gives each rank the same windows in the same order on
        # every run, which is what makes "skip the batches already consumed" a resume.
        # A data_memory_mb budget caps the object store the reads may fill ahead of the workers.
        dataset_config=DataConfig(execution_options=ExecutionOptions(
            preserve_order=True,
            resource_limits=ExecutionResources(object_store_memory=dcfg.data_memory_mb * 2**20) if dcfg.data_memory_mb else None,
        )),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError: the worker logs above hold the traceback
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CobraError(f"distributed training failed: {cause} (worker logs above; checkpoints in {storage / RUN_NAME})") from exc
    return _summary(out, result, started, dcfg.workers, zero_stage(ds_config))


def _summary(out: Path, result, started: float, workers: int, stage: int) -> dict:
    state = json.loads((out / "final" / "state.json").read_text())
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return {
        "epochs": state["epoch"],
        "steps": state["step"],
        "stopped_by": state.get("stopped_by", "epochs"),
        "best_epoch": state["best_epoch"],
        **{f"valid_{k}": round(v, 4) for k, v in best.get("valid", {}).items()},
        "workers": workers,
        "zero_stage": stage,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_minutes": round((time.time() - started) / 60, 1),
        "out": str(out),
    }


# ----------------------------------------------------------------------------- worker


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class _Progress:
    """Rank 0's per-step metrics: ``metrics.jsonl``, TensorBoard scalars, a readable line."""

    def __init__(self, out: Path, resumed_step: int, steps_per_epoch: int, every: int):
        self.path = out / "metrics.jsonl"
        if self.path.is_file():  # drop steps a restart will redo (they follow the checkpoint), and a line cut by a crash
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"))
        self.steps_per_epoch, self.every = steps_per_epoch, every
        self.t0, self.windows = time.perf_counter(), 0

    def step(self, record: dict, windows: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.windows += windows
        step = record["step"]
        if step % self.every:
            return
        self.file.flush()
        now = time.perf_counter()
        rate = self.windows / max(now - self.t0, 1e-9)
        self.t0, self.windows = now, 0
        for key in ("loss", "sparse", "dense", "lr"):
            self.tb.add_scalar(f"train/{key}", record[key], step)
        self.tb.add_scalar("train/samples_per_s", rate, step)
        log.info(
            "epoch %d step %d (%d/~%d) | loss %.4f sparse %.4f dense %.4f | lr %.2e | %.0f samples/s",
            record["epoch"], step, record["epoch_step"], self.steps_per_epoch, record["loss"], record["sparse"], record["dense"], record["lr"], rate,
        )

    def epoch(self, record: dict) -> None:
        for key, value in record.get("valid", {}).items():
            self.tb.add_scalar(f"valid/{key.replace('@', '_at_')}", value, record["step"])  # '@' is not a legal tag
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _full_state_dict(engine, stage: int, rank: int) -> dict | None:
    """Rank 0 gets the whole model's weights (ZeRO-3 gathers them: every rank must call)."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None


def _save_checkpoint(engine, state: dict, rank: int, metrics: dict) -> None:
    """Every rank saves its DeepSpeed partition and RNG; Ray Train merges and keeps them."""
    import ray.train

    from cobra_scale.train.trainer import rng_state

    tmp = Path(tempfile.mkdtemp(prefix="cobra-ckpt-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            (tmp / "state.json").write_text(json.dumps(state))
        name = f"epoch-{state['epoch']:04d}-step-{state['step']:08d}"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_metrics(state: dict, record: dict | None = None) -> dict:
    metrics = {"epoch": state["epoch"], "step": state["step"]}
    for key, value in (record or {}).items():
        if key == "valid":
            metrics.update({f"valid_{k}": v for k, v in value.items()})
        elif isinstance(value, (int, float)):
            metrics[key] = value
    return metrics


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed around the local trainer's model, optimiser and step."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    dcfg = cfg.distributed
    ds_config: dict = config["ds_config"]
    steps_per_epoch: int = config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not dcfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    import torch.distributed as dist

    from cobra_scale.model.beam import PrefixMasks
    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.train.data import batch_to
    from cobra_scale.train.streaming import catalogue_from_arrays, iter_train_batches, sample_examples
    from cobra_scale.train.trainer import (
        TRIM_EVERY_STEPS,
        inference_params,
        init_token_embeddings,
        make_optimizer,
        make_scheduler,
        plot_curve,
        repeat_offsets,
        restore_rng,
        save_weights,
        time_budget_stop,
        train_step,
        validate_and_keep_best,
    )

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    device = ray.train.torch.get_device()
    out = Path(cfg.out)
    (out / "workers").mkdir(parents=True, exist_ok=True)
    (out / "workers" / f"rank_{rank}.pid").write_text(str(os.getpid()))
    catalogue = catalogue_from_arrays(ray.get(config["catalogue"]))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = CobraModel(cfg.model)
    model.dense_loss_impl = cfg.dense_loss_impl
    model.dense_loss_scope = "global" if dcfg.global_negatives else "local"
    if cfg.model.constrained_codes:
        model.code_masks = PrefixMasks(catalogue.codes.numpy(), catalogue.codes_per_level, device)
    if cfg.init_embeddings:
        init_token_embeddings(model)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    stage = zero_stage(ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    precision = "fp32" if ds_config.get("bf16", {}).get("enabled") is True else pick_precision(cfg.precision, device.type)
    set_tf32(cfg.tf32, device.type)
    torch.manual_seed(cfg.seed + 1 + rank)  # independent dropout per rank

    state = {"epoch": 0, "step": 0, "batches": 0, "sums": {}, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    saved_rng = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=DS_TAG)
            state = json.loads((Path(folder) / "state.json").read_text())
            rng = Path(folder) / "rng" / f"rank_{rank}.pt"
            if rng.is_file():
                saved_rng = torch.load(rng, map_location="cpu", weights_only=True)
        log.info("resumed at epoch %d + %d batches, step %d", state["epoch"], state["batches"], state["step"])

    progress = valid = eval_model = None
    if rank == 0:
        progress = _Progress(out, state["step"], steps_per_epoch, dcfg.log_every_steps)
        split = Path(cfg.data) / "splits" / cfg.split
        valid = sample_examples(split / "valid", catalogue, cfg.model.max_items - 1, cfg.eval_users, cfg.seed)
        eval_model = CobraModel(cfg.model).to(device).eval()
    params = inference_params(cfg.inference)
    shard = ray.train.get_dataset_shard("train")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    stop = f"max_steps ({dcfg.max_steps})" if dcfg.max_steps and state["step"] >= dcfg.max_steps else None
    last_saved = state["step"] if checkpoint else -1
    if saved_rng is not None:  # last: building the evaluation model above draws random numbers
        restore_rng(saved_rng, device)

    while state["epoch"] < cfg.epochs and stop is None:
        epoch = state["epoch"] + 1
        epoch_started = time.time()
        sums = state["sums"] or {"total": 0.0, "sparse": 0.0, "dense": 0.0, "batches": 0}
        step_losses: list = []
        data_s = step_s = 0.0  # where an optimiser step's time goes: waiting for (collated) data vs the step
        ready = time.perf_counter()
        for batch in iter_train_batches(shard, catalogue, micro, dcfg.shuffle_buffer, cfg.seed + epoch, skip=state["batches"],
                                        same_id_negatives=cfg.dense_negatives, length_buckets=cfg.length_buckets):
            got = time.perf_counter()
            before = engine.global_steps
            losses = train_step(engine, batch_to(batch, device), None, None, cfg.grad_clip, precision, engine=engine)
            state["batches"] += 1
            parts = {"total": float(losses.total.detach()), "sparse": float(losses.sparse.detach()), "dense": float(losses.dense.detach())}
            for k, v in parts.items():
                sums[k] += v
            sums["batches"] += 1
            step_losses.append(parts)
            state["sums"] = sums
            data_s, step_s = data_s + got - ready, step_s + time.perf_counter() - got
            ready = time.perf_counter()
            if engine.global_steps == before:
                continue  # inside a gradient-accumulation window
            state["step"] = engine.global_steps
            if state["step"] % TRIM_EVERY_STEPS == 0:
                trim_host_memory()
            if progress is not None:
                mean = {k: sum(p[k] for p in step_losses) / len(step_losses) for k in parts}
                progress.step(
                    {"step": state["step"], "epoch": epoch, "epoch_step": math.ceil(state["batches"] / dcfg.grad_accum),
                     "loss": mean["total"], "sparse": mean["sparse"], "dense": mean["dense"], "lr": float(engine.get_lr()[0]),
                     "data_s": round(data_s, 4), "step_s": round(step_s, 4), "time": time.time()},
                    windows=micro * world * len(step_losses),
                )
            step_losses, data_s, step_s = [], 0.0, 0.0
            if dcfg.checkpoint_every_steps and state["step"] % dcfg.checkpoint_every_steps == 0:
                _save_checkpoint(engine, state, rank, _report_metrics(state))
                last_saved = state["step"]
            if dcfg.max_steps and state["step"] >= dcfg.max_steps:
                stop = f"max_steps ({dcfg.max_steps})"
                break
            ready = time.perf_counter()  # checkpoints and logging are not data waiting
        if stop is not None:
            break
        # ---- epoch end: validate on rank 0 (all ranks gather under ZeRO-3), decide, checkpoint
        record = {"epoch": epoch, "step": state["step"], **{f"train_{k}": sums[k] / max(1, sums["batches"]) for k in ("total", "sparse", "dense")},
                  "elapsed_s": round(time.time() - config["started"], 1)}
        evaluate_now = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        weights = _full_state_dict(engine, stage, rank)
        decision = [None, record]
        if rank == 0:
            eval_model.load_state_dict(weights)
            record["temperature"] = float(eval_model.temperature.detach())
            record.update(repeat_offsets(eval_model))  # as the local trainer's history
            if evaluate_now:
                record["valid"] = validate_and_keep_best(eval_model, catalogue, valid, params, device, state, epoch, cfg, out)
            if state["bad_evals"] >= cfg.patience:
                decision[0] = f"early stop (no improvement in {cfg.patience} validations)"
            else:
                now = time.time()
                decision[0] = time_budget_stop(cfg.max_minutes, now - config["started"], now - epoch_started)
            progress.epoch(record)
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in {**record.get("valid", {}), "train_sparse": record["train_sparse"], "train_dense": record["train_dense"]}.items()))
        dist.broadcast_object_list(decision, src=0)
        stop, record = decision
        state.update(epoch=epoch, batches=0, sums={})
        state["history"].append(record)  # best / bad_evals are rank 0's; only its state.json is saved
        _save_checkpoint(engine, state, rank, _report_metrics(state, record))
        last_saved = state["step"]

    # ---- the end: a last checkpoint if steps ran since the previous one, final weights
    if last_saved != state["step"]:
        _save_checkpoint(engine, state, rank, _report_metrics(state))
    weights = _full_state_dict(engine, stage, rank)
    if rank == 0:
        eval_model.load_state_dict(weights)
        save_weights(eval_model, out / "final")
        state["stopped_by"] = stop or "epochs"
        (out / "final" / "state.json").write_text(json.dumps(state))
        (out / "history.json").write_text(json.dumps(state["history"], indent=2))
        if state["history"]:
            plot_curve(state["history"], out / "curve.png")
        if (out / "best").is_dir():
            (out / "best" / "state.json").write_text(json.dumps({"epoch": state["best_epoch"], "valid_ndcg@10": state["best"]}))
        progress.close()
    dist.barrier()
