"""Config schemas of ``cobra train`` and ``cobra eval`` (dataclasses only)."""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Optional

from cobra_scale.config import field
from cobra_scale.errors import ConfigError
from cobra_scale.model.config import CobraConfig


@dataclass
class InferenceConfig:
    """Coarse-to-fine inference settings (BeamFusion)."""

    mode: str = field("cobra", help="cobra | no_fusion | dense_only | sparse_only | liger")
    beams: int = field(20, help="M, beams (sparse IDs) per user")
    tau: float = field(1.0, help="BeamFusion temperature on beam scores")
    psi: float = field(20.0, help="BeamFusion temperature on cosine similarity")
    normalize: str = field("per_beam", help="BeamFusion's cosine softmax over the candidates of each beam ('per_beam': P(ID) x P(item | ID)) or of all beams ('global')")
    prior_weight: float = field(
        0.0, help="cobra mode: weight λ of the run's item-to-item transition prior (`cobra prior`) mixed into BeamFusion, "
        "(1-λ)·BeamFusion + λ·prior; 0 = the paper's COBRA (a hybrid beyond the paper when > 0)",
    )
    free_query_weight: float = field(
        0.0, help="cobra mode: weight w of the model's ID-free dense vector (the head model.history_dense_weight trains, before "
        "the ID's codes) in each beam's query inside its ID, normalize((1-w)·v(ID) + w·v_free); 0 = the paper's vector for "
        "that ID (beyond the paper when > 0)",
    )
    free_mix_weight: float = field(
        0.0, help="cobra mode: weight λ of the same model's ID-free ranking mixed into BeamFusion, (1-λ)·BeamFusion + λ·softmax(ψ·cos) "
        "over the ID-free vector's top free_mix_candidates items (the head model.history_dense_weight trains); 0 = the paper's COBRA "
        "(beyond the paper when > 0)",
    )
    free_mix_candidates: int = field(0, help="with free_mix_weight > 0: the ID-free vector's top items the mixture adds (0 = the list's K)")

    max_per_id: int = field(
        0, help="N, candidates per beam's ID scored by BeamFusion: the best N by cosine (0 = every item of the ID; cap it when "
        "IDs hold thousands of items). The in-memory search of validation and of `cobra eval` without --index; "
        "a faiss index has its own (`cobra index max_per_id=`)",
    )

    def __post_init__(self) -> None:
        if self.max_per_id < 0:
            raise ConfigError("inference.max_per_id must be >= 0 (0 = every item of the ID)")
        if not 0 <= self.prior_weight <= 1:
            raise ConfigError("inference.prior_weight must lie in [0, 1]")
        if not 0 <= self.free_query_weight <= 1:
            raise ConfigError("inference.free_query_weight must lie in [0, 1]")
        if not 0 <= self.free_mix_weight <= 1:
            raise ConfigError("inference.free_mix_weight must lie in [0, 1]")
        if self.free_mix_candidates < 0:
            raise ConfigError("inference.free_mix_candidates must be >= 0 (0 = the list's K)")
        for name in ("prior_weight", "free_query_weight", "free_mix_weight"):
            if getattr(self, name) > 0 and self.mode != "cobra":
                raise ConfigError(f"inference.{name} applies to mode cobra, not {self.mode}")
        if self.mode not in ("cobra", "no_fusion", "dense_only", "sparse_only", "liger"):
            raise ConfigError(f"inference.mode must be cobra|no_fusion|dense_only|sparse_only|liger, got '{self.mode}'")
        if self.beams <= 0:
            raise ConfigError("inference.beams must be > 0")
        if self.normalize not in ("global", "per_beam"):
            raise ConfigError("inference.normalize must be 'global' or 'per_beam'")


def check_free_query_head(model: CobraConfig, run: str | Path = "", **weights: float) -> None:
    """Each of ``weights`` (free_query_weight=…, free_mix_weight=…) > 0 needs a model trained with
    model.history_dense_weight > 0 (its ID-free vector is otherwise untrained): the one check of train, eval, recommend and serve."""
    for name, weight in weights.items():
        if weight > 0 and not model.history_dense_weight > 0:
            raise ConfigError(f"{name} {weight:g} needs a model trained with model.history_dense_weight > 0 (the head that "
                              f"trains the ID-free dense vector){f'; {run} has none' if run else ''}")


@dataclass
class DistributedConfig:
    """``launcher: ray``: Ray Train workers, each running the training step under DeepSpeed ZeRO."""

    workers: int = field(2, help="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = field(1.0, help="logical CPUs reserved per worker (fractions leave room for Ray Data reads)")
    use_gpu: bool = field(False, help="one GPU per worker (NCCL); otherwise CPU workers (gloo, DS_ACCELERATOR=cpu)")
    deepspeed: str = field("configs/deepspeed/zero2.json", help="DeepSpeed config JSON; batch fields 'auto' are filled from batch_size / workers / grad_accum")
    grad_accum: int = field(1, help="micro-batches per optimiser step; per-worker micro-batch = batch_size / (workers * grad_accum)")
    checkpoint_every_steps: int = field(0, help="also checkpoint every N optimiser steps (0 = at epoch ends only)")
    keep_checkpoints: int = field(2, help="most recent checkpoints Ray Train keeps")
    max_failures: int = field(0, help="worker-group failures to recover from (restart from the last checkpoint); -1 = unlimited")
    address: Optional[str] = field(None, help="Ray cluster to join (default: $RAY_ADDRESS, else an in-process Ray on 127.0.0.1)")
    storage: Optional[str] = field(None, help="Ray Train storage for checkpoints (default: <out>/ray; a shared path on multi-node clusters)")
    shuffle_buffer: int = field(20000, help="windows in each worker's local shuffle buffer (0 = stream order)")
    data_memory_mb: int = field(0, help="object-store budget of the Ray Data input pipeline in MB (0 = Ray's default share); bounds the blocks read ahead")
    block_mb: int = field(16, help="target size in MB of the input pipeline's blocks (0 = Ray Data's default, 128 MB); smaller blocks bound what is read ahead: job memory 5M vs 0.5M users 1.08x at 16, 1.22x at 128 (docs/distributed.md)")
    log_every_steps: int = field(10, help="progress line + TensorBoard scalars every N optimiser steps")
    max_steps: int = field(0, help="stop after this many optimiser steps (0 = run the epochs); benchmarks and tests")
    global_negatives: bool = field(
        True, help="dense loss: score each rank's predictions against the batch items of every rank (all-gather), as the local "
        "trainer does for the whole batch; false = each rank's own micro-batch only",
    )

    def __post_init__(self) -> None:
        if self.workers <= 0 or self.grad_accum <= 0:
            raise ConfigError("distributed.workers and distributed.grad_accum must be > 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError("distributed.cpus_per_worker must be > 0")
        if self.keep_checkpoints <= 0:
            raise ConfigError("distributed.keep_checkpoints must be > 0")
        if min(self.checkpoint_every_steps, self.shuffle_buffer, self.max_steps, self.data_memory_mb, self.block_mb) < 0 or self.log_every_steps <= 0:
            raise ConfigError("distributed step counts, data_memory_mb and block_mb must be >= 0 (log_every_steps > 0)")


@dataclass
class TrainConfig:
    """``cobra train``: train COBRA; in this process (CPU or one GPU) or on Ray Train workers with DeepSpeed (``launcher=ray``)."""

    data: str = field(help="dataset folder: items.parquet and splits/<split>/{train,valid,test}")
    ids: str = field(help="semantic-ID folder of `cobra ids` (sids.parquet)")
    out: str = field(help="run folder: checkpoints/, best/, history.json, curve.png")
    split: str = field("loo", help="split folder under data/splits")
    items: Optional[str] = field(None, help="items catalogue (default: <data>/items.parquet)")
    epochs: int = field(30, help="max epochs")
    steps_per_epoch: int = field(
        0, help="cap each epoch at N steps, a different seeded sample of the windows each epoch (0 = a full pass); for logs of "
        "millions of users, where a pass takes hours and validation, checkpoints and the time budget act at epoch ends. Local launcher",
    )
    batch_size: int = field(512, help="training windows per step")
    lr: float = field(2e-3, help="AdamW peak learning rate")
    weight_decay: float = field(0.01, help="AdamW weight decay")
    id_weight_decay: float = field(
        0.0,
        help="AdamW weight decay on the sparse-ID rows alone (model.code_emb and the ID-trie rows model.prefix_emb, which are "
        "also the code heads' per-ID scores); embeddings get none otherwise. Against the code predictions over-fitting "
        "(not in the paper); 0 = off",
    )
    successor_weight_decay: float = field(
        0.0,
        help="AdamW weight decay on the successor rows alone (model.succ_emb, with model.successor_embedding): a shrinkage "
        "of the per-item transition term toward none, against its over-fitting (not in the paper); 0 = off",
    )
    warmup_steps: int = field(200, help="linear warm-up steps, then cosine decay to 10%")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    seed: int = field(0, help="random seed")
    threads: int = field(0, help="torch CPU threads; 0 = all cores")
    device: str = field("auto", help="auto | cpu | cuda")
    precision: str = field("fp32", help="fp32 | bf16 (autocast; standard on GPUs, ~1.4x faster on CPUs with AVX512-BF16/AMX; falls back to fp32 on CPUs without native bf16, where it would be ~50x slower)")
    tf32: bool = field(True, help="on CUDA: fp32 matmuls on TF32 tensor cores (Ampere and later; float32 matmul precision 'high'); no effect on CPU")
    init_embeddings: bool = field(True, help="initialise token embeddings from all-MiniLM-L6-v2 (PCA-projected)")
    item_embedding_init: str = field(
        "zeros",
        help="how model.item_embedding's rows start: zeros | behaviour = each item's co-occurrence vector over the training "
        "split (PPMI + truncated SVD, as `cobra ids` behaviour.*), scaled to item_embedding_scale x the median norm of the "
        "initial text vectors; items that co-occur with none start at zero. Local launcher",
    )
    item_embedding_scale: float = field(1.0, help="norm of the behaviour-initialised item rows relative to the median initial text vector")
    item_embedding_window: int = field(3, help="item_embedding_init / id_embedding_init = behaviour: items at most this many steps apart co-occur")
    id_embedding_init: str = field(
        "zeros",
        help="how model.prefix_embeddings' rows (one per node of the ID trie, shared by the input tokens and the code heads) "
        "start: zeros | behaviour = the direction of the mean co-occurrence vector of the node's items over the training split "
        "(as item_embedding_init), at id_embedding_scale x the median norm of the initial text vectors; nodes whose items "
        "co-occur with none start at zero. Local launcher",
    )
    id_embedding_scale: float = field(1.0, help="norm of the behaviour-initialised prefix rows relative to the median initial text vector")
    same_id_negatives: int = field(0, help="dense loss: add up to N other items of each target's sparse ID to the batch as hard negatives (0 = in-batch only)")
    catalogue_negatives: int = field(
        0,
        help="dense loss: add a term scoring each prediction against N catalogue items (plus the batch's) from a bank of their "
        "latest vectors (no gradient, re-encoded each epoch; the positive is the target's bank vector); -1 = the whole "
        "catalogue, 0 = in-batch only (the paper). Local launcher",
    )
    catalogue_live_rows: bool = field(
        False,
        help="with catalogue_negatives and model.item_embedding: the bank keeps each item's text vector and the catalogue "
        "term's keys add the item's current per-item row, with its gradient, so every sampled item's row learns from every "
        "prediction (as SASRec-CE's output embedding does); the text part stays stale. Not with id_bank_negatives",
    )
    id_bank_negatives: int = field(
        0,
        help="dense loss: add a term scoring each prediction against up to N other items of its target's own sparse ID from "
        "the bank of latest vectors (no gradient on those keys; the target's bank vector is the positive): the softmax "
        "P(item | ID) that inference ranks inside a beam's ID with (every item of an ID of at most N + 1; 0 = off; w/o ID: "
        "the same hard negatives). Local launcher",
    )
    ema_decay: float = field(
        0.0,
        help="keep an exponential moving average of the weights (torch.optim.swa_utils, updated every step) with this decay, "
        "and validate, keep as best and export the average instead of the raw weights (0 = off; 0.999 averages ~1,000 steps). "
        "Local launcher",
    )
    length_buckets: bool = field(True, help="batch windows of similar length together (less padding): sorted inside pools of 64 batches (local) or of 16 micro-batches of a worker's stream (ray)")
    dedup_level: bool = field(False, help="append a code numbering items inside an ID (for the TIGER-like w/o Dense ablation)")
    eval_users: int = field(0, help="validation users per epoch (0 = all)")
    eval_every: int = field(1, help="validate every N epochs")
    patience: int = field(4, help="stop after this many validations without improvement of valid ndcg@10")
    max_minutes: float = field(
        0.0, help="wall-clock budget for training (0 = none): no epoch is started that would end past it (judged from the "
        "last epoch's length); the best checkpoint is kept",
    )
    resume: bool = field(True, help="resume from out/checkpoints/last if present")
    dense_loss_impl: str = field("auto", help="dense loss kernel: auto | reference | tiled | triton")
    optimizer_impl: str = field(
        "auto", help="AdamW's implementation: fused (one pass over each parameter; at 1M items x 128 its step is ~8x "
        "faster on one CPU thread, session 39) | foreach (the trainer's before session 39, for bit-identical reruns of "
        "earlier runs) | auto = fused",
    )
    launcher: str = field("local", help="local = this process (CPU or one GPU) | ray = Ray Train + DeepSpeed ZeRO (see distributed.*)")
    model: CobraConfig = dc_field(default_factory=CobraConfig)
    inference: InferenceConfig = dc_field(default_factory=InferenceConfig)
    distributed: DistributedConfig = dc_field(default_factory=DistributedConfig)

    @property
    def items_path(self) -> Path:
        """The items catalogue: ``items`` or ``<data>/items.parquet``."""
        return Path(self.items) if self.items else Path(self.data) / "items.parquet"

    @property
    def dense_negatives(self) -> int:
        """Same-ID negatives per target that the batches get (none without a dense loss)."""
        return self.same_id_negatives if self.model.use_dense else 0

    def __post_init__(self) -> None:
        if self.launcher not in ("local", "ray"):
            raise ConfigError("launcher must be local or ray")
        if self.weight_decay < 0 or self.id_weight_decay < 0 or self.successor_weight_decay < 0:
            raise ConfigError("weight_decay, id_weight_decay and successor_weight_decay must be >= 0")
        if self.successor_weight_decay > 0 and not self.model.successor_embedding:
            raise ConfigError("successor_weight_decay needs model.successor_embedding=true (there are no successor rows to decay)")
        check_free_query_head(self.model, free_query_weight=self.inference.free_query_weight, free_mix_weight=self.inference.free_mix_weight)
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_minutes < 0:
            raise ConfigError("max_minutes must be >= 0 (0 = no time budget)")
        if self.same_id_negatives < 0:
            raise ConfigError("same_id_negatives must be >= 0")
        if self.steps_per_epoch < 0:
            raise ConfigError("steps_per_epoch must be >= 0 (0 = a full pass over the windows)")
        if self.steps_per_epoch and self.launcher == "ray":
            raise ConfigError("steps_per_epoch is for the local launcher; with launcher=ray bound the run with distributed.max_steps")
        if self.catalogue_negatives < -1:
            raise ConfigError("catalogue_negatives must be -1 (whole catalogue), 0 (off) or a count")
        if self.catalogue_live_rows and not (self.catalogue_negatives and self.model.item_embedding and self.model.use_dense):
            raise ConfigError("catalogue_live_rows changes the keys of the catalogue term: it needs catalogue_negatives != 0 and "
                              "model.item_embedding=true (and the dense path)")
        if self.catalogue_live_rows and self.id_bank_negatives:
            raise ConfigError("catalogue_live_rows keeps text vectors in the bank, which id_bank_negatives reads as whole vectors: use one")
        if self.id_bank_negatives < 0:
            raise ConfigError("id_bank_negatives must be >= 0 (0 = off): items of the target's ID per prediction")
        if self.id_bank_negatives and not self.model.use_dense:
            raise ConfigError("id_bank_negatives needs the dense path (model.use_dense=true)")
        if self.item_embedding_init not in ("zeros", "behaviour"):
            raise ConfigError("item_embedding_init must be zeros or behaviour")
        if self.item_embedding_init == "behaviour":
            if not self.model.item_embedding:
                raise ConfigError("item_embedding_init=behaviour needs model.item_embedding=true")
            if self.launcher == "ray":
                raise ConfigError("item_embedding_init=behaviour is built for the local launcher only")
            if self.item_embedding_scale <= 0 or self.item_embedding_window <= 0:
                raise ConfigError("item_embedding_scale and item_embedding_window must be > 0")
        if self.id_embedding_init not in ("zeros", "behaviour"):
            raise ConfigError("id_embedding_init must be zeros or behaviour")
        if self.id_embedding_init == "behaviour":
            if not (self.model.prefix_embeddings and self.model.use_sparse):
                raise ConfigError("id_embedding_init=behaviour needs model.prefix_embeddings=true and model.use_sparse=true")
            if self.launcher == "ray":
                raise ConfigError("id_embedding_init=behaviour is built for the local launcher only")
            if self.id_embedding_scale <= 0 or self.item_embedding_window <= 0:
                raise ConfigError("id_embedding_scale and item_embedding_window must be > 0")
        if self.ema_decay and self.launcher == "ray":
            raise ConfigError("ema_decay is built for the local launcher only (the Ray trainer keeps no weight average)")
        if self.catalogue_negatives and self.launcher == "ray":
            raise ConfigError("catalogue_negatives is built for the local launcher only; use same_id_negatives with launcher=ray")
        if self.id_bank_negatives and self.launcher == "ray":
            raise ConfigError("id_bank_negatives is built for the local launcher only; use same_id_negatives with launcher=ray")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device must be auto|cpu|cuda")
        if self.launcher == "ray" and self.device == "cuda" and not self.distributed.use_gpu:
            raise ConfigError("launcher=ray device=cuda: Ray Train workers get GPUs only with distributed.use_gpu=true")
        if self.launcher == "ray" and self.device == "cpu" and self.distributed.use_gpu:
            raise ConfigError("launcher=ray device=cpu contradicts distributed.use_gpu=true (one GPU per worker)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision must be fp32 or bf16")
        if self.optimizer_impl not in ("auto", "fused", "foreach"):
            raise ConfigError(f"optimizer_impl must be auto, fused or foreach, not {self.optimizer_impl!r}")


@dataclass
class EvalConfig:
    """``cobra eval``: evaluate a trained run on valid/test; choose tau/psi/beams on valid only."""

    run: str = field(help="run folder of `cobra train` (uses run/best)")
    out: Optional[str] = field(None, help="where to write eval.json (default: the run folder)")
    split_name: str = field("test", help="valid | test")
    batch_users: int = field(256, help="users per inference batch")
    max_users: int = field(0, help="evaluate a seeded sample of this many users (0 = all; report figures with 0)")
    valid_users: int = field(-1, help="users sampled for the validation grid (-1 = as max_users, 0 = all); the grid only ranks settings")
    valid_unseen: bool = field(False, help="leave out of the validation users (the grid's pool and split_name=valid's scores) those the "
                               "trainer chose the checkpoint on (its eval_users sample with its seed), so that they measure unseen users")
    exclude_history: bool = field(False, help="also mask the user's history items (the papers' protocol does not)")
    grid_tau: list = field([], help="tau values tried on valid (empty = the run's)")
    grid_psi: list = field([], help="psi values tried on valid (empty = the run's)")
    grid_beams: list = field([], help="beam counts tried on valid (empty = the run's); one value sets it (cobra, sparse_only, liger)")
    grid_normalize: list = field([], help="BeamFusion normalisations tried on valid: per_beam and/or global (empty = the run's)")
    grid_prior_weight: list = field([], help="weights of the transition prior tried on valid, in [0, 1] (empty = the run's, 0); a weight > 0 counts <run>/prior if missing")
    grid_free_query_weight: list = field([], help="weights of the model's ID-free dense vector in each beam's query tried on valid, in "
                                         "[0, 1] (empty = the run's, 0 = the paper); > 0 needs model.history_dense_weight > 0")
    grid_free_mix_weight: list = field([], help="weights λ of the model's ID-free ranking mixed into BeamFusion tried on valid, in [0, 1] "
                                       "(empty = the run's, 0 = the paper); > 0 needs model.history_dense_weight > 0")
    modes: list = field(["cobra"], help="inference modes to report")
    ks: list = field([5, 10], help="cut-offs K of Recall/NDCG/diversity@K (e.g. ks=[50,100,200,500,800])")
    select_on: str = field("", help="validation metric that picks tau/psi/beams (default ndcg@10, else ndcg@<smallest K>)")
    split: Optional[str] = field(None, help="split folder under <data>/splits to evaluate on, e.g. time or loo (default: the run's)")
    index: Optional[str] = field(None, help="index folder of `cobra index` (faiss IVF by sparse ID); default: exact search in memory")
    device: str = field("auto", help="auto | cpu | cuda (local path and the driver)")
    index_device: str = field("follow", help="follow | auto | cpu | cuda: where faiss searches `index` (follow = on the GPU when inference "
                              "runs on CUDA and the faiss build has one, else on the CPU)")
    workers: int = field(0, help="Ray Data actors scoring users (0 = in this process, no Ray)")
    worker_cpus: float = field(1.0, help="CPUs per Ray actor (also its torch threads)")
    worker_gpus: float = field(0.0, help="GPUs per Ray actor (> 0 runs inference on CUDA)")
    ray_address: Optional[str] = field(None, help="Ray cluster to join (default: $RAY_ADDRESS or in-process Ray on 127.0.0.1)")
    seed: int = field(0, help="seed of the uniform user sample (max_users)")
    confidence: float = field(0.95, help="level of the reported confidence intervals (normal approximation over users)")
    tau_sweep: list = field([], help="tau values of the recall-diversity curve (cobra mode; PNG + JSON), e.g. tau_sweep=[0.1,0.3,1,3,10]")
    diversity_ids: Optional[str] = field(
        None, help="sids.parquet (or a `cobra ids` folder) whose IDs diversity@K counts (default: the run's own); e.g. the 3x32 IDs "
        "for a w/o-Dense run on item-level IDs, so that models on different IDs are compared on one scale",
    )
    plots: bool = field(False, help="also draw the item-embedding figures (intra/inter-ID cosine heatmap, 2-D map by ID)")
    per_user: bool = field(False, help="also write per_user_<split_name>.parquet: each scored user's metrics per mode (user_id, has_target, "
                           "'<mode>/<metric>' columns), for paired comparisons of two runs over the same users (`cobra compare`)")
    plot_ids: int = field(16, help="embedding plots: the largest IDs drawn")
    plot_items: int = field(1500, help="embedding plots: items sampled for the 2-D map")

    def __post_init__(self) -> None:
        if self.split_name not in ("valid", "test"):
            raise ConfigError("split_name must be valid or test")
        if not self.ks or any(int(k) <= 0 for k in self.ks):
            raise ConfigError("ks must be a non-empty list of positive cut-offs")
        if self.workers < 0 or self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise ConfigError("workers must be >= 0, worker_cpus > 0, worker_gpus >= 0")
        if not 0 < self.confidence < 1:
            raise ConfigError("confidence must be in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device must be auto|cpu|cuda")
        if self.index_device not in ("follow", "auto", "cpu", "cuda"):
            raise ConfigError(f"index_device must be follow|auto|cpu|cuda, got {self.index_device!r}")
        bad = [n for n in self.grid_normalize if n not in ("per_beam", "global")]
        if bad:
            raise ConfigError(f"grid_normalize takes per_beam and/or global, got {bad}")
        for name in ("grid_prior_weight", "grid_free_query_weight", "grid_free_mix_weight"):
            try:
                weights = [float(w) for w in getattr(self, name)]
            except (TypeError, ValueError):
                raise ConfigError(f"{name} takes numbers in [0, 1], got {list(getattr(self, name))}") from None
            if any(not 0 <= w <= 1 for w in weights):
                raise ConfigError(f"{name} takes numbers in [0, 1], got {weights}")
        if self.valid_users < -1:
            raise ConfigError("valid_users must be >= -1")
        if self.max_users < 0 or self.batch_users <= 0:
            raise ConfigError("max_users must be >= 0 and batch_users > 0")


@dataclass
class ExportConfig:
    """``cobra export``: a DeepSpeed checkpoint of a distributed run -> plain artifacts that `load_run` reads."""

    run: str = field(help="run folder of `cobra train launcher=ray` (its config.yaml and ray/ checkpoints)")
    out: str = field(help="export folder: best/model.safetensors, text_encoder/ (save_pretrained), config.yaml, ids/, items.parquet")
    checkpoint: Optional[str] = field(None, help="checkpoint folder to export (default: the run's latest)")
    copy_catalogue: bool = field(True, help="copy items.parquet and the semantic IDs into the export (self-contained)")


@dataclass
class RecommendConfig:
    """``cobra recommend``: top-K items for a history (or for users of a split), with titles."""

    run: str = field(help="run folder of `cobra train`")
    history: list = field([], help="item ids, oldest first, e.g. history=[12,40,7]")
    users: int = field(3, help="when no history is given: show this many users of the test split")
    k: int = field(10, help="items to return")
    exclude_history: bool = field(False, help="do not recommend items of the history")
    inference: InferenceConfig = dc_field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1 (got {self.k})")
        if self.users < 1:
            raise ConfigError(f"users must be >= 1 (got {self.users})")
        bad = [x for x in self.history if isinstance(x, bool) or not _is_item_id(x)]
        if bad:
            raise ConfigError(f"history takes integer item ids, e.g. history=[12,40,7] (got {bad})")
        self.history = [int(x) for x in self.history]


def _is_item_id(x) -> bool:
    """An integer, or a string of one (YAML may quote it): never a float or a word, which would be cast silently."""
    if isinstance(x, int):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()
