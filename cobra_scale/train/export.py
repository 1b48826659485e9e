"""``cobra export``: a DeepSpeed checkpoint of a distributed run -> plain artifacts.

The export folder is a run folder that :func:`~cobra_scale.train.trainer.load_run` (and so
``cobra eval``, ``cobra recommend`` and serving) reads, with nothing DeepSpeed-specific::

    config.yaml              the run's resolved TrainConfig; ids / items point into the export
    best/model.safetensors   fp32 weights consolidated from the ZeRO partitions
    best/config.yaml, best/state.json
    text_encoder/            the item text encoder: BERT (save_pretrained) + tokenizer
                             + projection.safetensors (its pooled output -> d_model projection)
                             + pooling.json (cls | mean, and whether per-item rows are added)
    ids/                     sids.parquet + quantizer/ (the semantic IDs the model was trained on)
    items.parquet            the catalogue
    export.json              which checkpoint, its epoch and step

    cobra export --run runs/beauty_ray --out exports/beauty
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from cobra_scale.config import load_config, save_config
from cobra_scale.errors import CobraError
from cobra_scale.train.configs import ExportConfig, TrainConfig

log = logging.getLogger(__name__)


def checkpoints(run: str | Path) -> list[Path]:
    """The DeepSpeed checkpoints Ray Train kept for ``run``, oldest first (by epoch, step)."""
    from cobra_scale.train.ray_trainer import DS_TAG, RUN_NAME, storage_root

    cfg = load_config(TrainConfig, Path(run) / "config.yaml")
    root = storage_root(dataclasses.replace(cfg, out=str(Path(run))) if not cfg.distributed.storage else cfg) / RUN_NAME
    found = []
    for folder in root.glob("*/") if root.is_dir() else []:
        if (folder / "state.json").is_file() and (folder / DS_TAG).is_dir():
            state = json.loads((folder / "state.json").read_text())
            found.append(((state["epoch"], state["step"]), folder))
    return [folder for _, folder in sorted(found)]


def consolidated_state_dict(checkpoint: Path) -> dict:
    """fp32 weights of a DeepSpeed checkpoint (any ZeRO stage), on CPU, in one process."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cobra_scale.train.ray_trainer import DS_TAG

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)


def run(cfg: ExportConfig) -> dict:
    from safetensors.torch import save_file

    from cobra_scale.model.cobra import CobraModel
    from cobra_scale.train.data import load_tokenizer
    from cobra_scale.train.trainer import save_weights

    run_dir, out = Path(cfg.run), Path(cfg.out)
    if not (run_dir / "config.yaml").is_file():
        raise CobraError(f"{run_dir} has no config.yaml (not a run folder of `cobra train`)")
    if cfg.checkpoint:
        checkpoint = Path(cfg.checkpoint)
        if not (checkpoint / "state.json").is_file():
            raise CobraError(f"{checkpoint} is not a checkpoint of the distributed trainer (no state.json)")
    else:
        found = checkpoints(run_dir)
        if not found:
            raise CobraError(f"no checkpoint found for {run_dir} (train with `cobra train launcher=ray` first)")
        checkpoint = found[-1]
    tcfg = load_config(TrainConfig, run_dir / "config.yaml")
    state = json.loads((checkpoint / "state.json").read_text())
    log.info("exporting %s (epoch %d, step %d) to %s", checkpoint, state["epoch"], state["step"], out)

    model = CobraModel(tcfg.model)
    weights = consolidated_state_dict(checkpoint)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CobraError(f"{checkpoint} does not match the run's model config: {str(exc).splitlines()[0]}") from exc
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "best")

    encoder_dir = out / "text_encoder"
    model.encoder.bert.save_pretrained(str(encoder_dir))
    load_tokenizer().save_pretrained(str(encoder_dir))
    save_file({k: v.detach().contiguous() for k, v in model.encoder.proj.state_dict().items()}, str(encoder_dir / "projection.safetensors"))
    # how the projection reads BERT's outputs; per-item rows (item_embedding) stay in best/model.safetensors
    (encoder_dir / "pooling.json").write_text(json.dumps({"pooling": tcfg.model.text_pooling, "item_embedding": tcfg.model.item_embedding}))

    if cfg.copy_catalogue:
        ids_src = Path(tcfg.ids)
        shutil.rmtree(out / "ids", ignore_errors=True)
        (out / "ids").mkdir()
        shutil.copy2(ids_src / "sids.parquet", out / "ids" / "sids.parquet")
        shutil.copytree(ids_src / "quantizer", out / "ids" / "quantizer")
        shutil.copy2(tcfg.items_path, out / "items.parquet")
        tcfg = dataclasses.replace(tcfg, ids=str((out / "ids").resolve()), items=str((out / "items.parquet").resolve()))
    tcfg = dataclasses.replace(tcfg, out=str(out))
    save_config(tcfg, out)
    save_config(tcfg, out / "best")
    (out / "best" / "state.json").write_text(json.dumps({"epoch": state["epoch"], "step": state["step"], "checkpoint": str(checkpoint)}))
    manifest = {"checkpoint": str(checkpoint), "epoch": state["epoch"], "step": state["step"], "parameters": sum(p.numel() for p in model.parameters())}
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return {**manifest, "out": str(out)}
