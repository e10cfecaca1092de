"""Training a model from its config on Lightning (CV ``main.py``): checkpoints, EMA weights and metrics.

Outputs go to ``LOGDIR/NAME/``: ``checkpoints/*.ckpt`` (Lightning checkpoints for ``resume``, released key
layout), ``weights/step-*.safetensors`` and ``weights/last.safetensors`` (EMA weights) and ``metrics.csv``
(losses). Lightning is imported only here and in :mod:`ldm.training.trainers`, never on the inference path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import SdgenError
from ldm.training.config import build_data, build_module, check_resume, load_training_config, writable_dir

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": None, "float16": "float16", "bfloat16": "bfloat16"}


@dataclass
class TrainResult:
    """Where a training run left its weights."""

    run_dir: Path
    global_step: int
    last_weights: Path
    exported: Optional[Path] = None


def train(
    base: list[str],
    *,
    logdir: str = "logs",
    name: Optional[str] = None,
    resume: Optional[str] = None,
    max_steps: Optional[int] = None,
    seed: Optional[int] = None,
    devices: Optional[str] = None,
    accelerator: Optional[str] = None,
    every_n_steps: Optional[int] = None,
    num_threads: Optional[int] = None,
    export: Optional[str] = None,
    export_dtype: str = "float32",
) -> TrainResult:
    """Train the model of the merged ``base`` configs (raises SdgenError for bad input before anything runs)."""
    dtypes = EXPORT_DTYPES
    if export_dtype not in dtypes:
        raise SdgenError(f"--export-dtype must be one of {', '.join(dtypes)}, not {export_dtype!r}")
    if export is not None and not export.endswith(".safetensors"):
        raise SdgenError(f"--export must name a .safetensors file, not {export!r}")
    cfg = load_training_config(list(base))
    training = cfg.get("training") or {}
    run_dir = writable_dir(Path(logdir) / (name or Path(base[-1]).stem))
    for flag, value in (("--max-steps", max_steps), ("--every-n-steps", every_n_steps), ("--num-threads", num_threads)):
        if value is not None and value < 1:
            raise SdgenError(f"{flag} must be at least 1, got {value}")

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from ldm.training.trainers import ExportWeights

    threads = num_threads or training.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    pl.seed_everything(seed if seed is not None else training.get("seed", 23), workers=True)
    module = build_module(cfg)
    data = build_data(cfg)
    if resume is not None:
        check_resume(module, Path(resume))

    trainer_kwargs = dict(cfg.get("lightning", {}).get("trainer", {}) or {})
    if max_steps is not None:
        trainer_kwargs["max_steps"] = max_steps
    if devices is not None:
        trainer_kwargs["devices"] = int(devices) if devices.isdigit() else devices
    if accelerator is not None:
        trainer_kwargs["accelerator"] = accelerator
    trainer_kwargs.setdefault("accelerator", "cpu")
    trainer_kwargs.setdefault("devices", 1)
    trainer_kwargs.setdefault("max_epochs", -1)
    every = every_n_steps or training.get("checkpoint_every_n_steps", 500)
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}", every_n_train_steps=every,
                        save_top_k=-1, save_last=True, auto_insert_metric_name=False),
        ExportWeights(run_dir / "weights", every),
    ]
    try:
        trainer = pl.Trainer(logger=CSVLogger(str(run_dir), name="", version=""), callbacks=callbacks,
                             default_root_dir=str(run_dir), enable_progress_bar=False,
                             enable_model_summary=False, **trainer_kwargs)
    except (TypeError, ValueError) as exc:
        raise SdgenError(f"config: lightning.trainer: {exc}") from exc
    logger.info("training %s for %s steps into %s", cfg.model.target, trainer_kwargs.get("max_steps"), run_dir)
    trainer.fit(module, train_dataloaders=data.train_dataloader(), ckpt_path=resume)
    result = TrainResult(run_dir, trainer.global_step, run_dir / "weights" / "last.safetensors")
    if export is not None:
        from ldm.training.trainers import export_weights

        dtype = getattr(torch, dtypes[export_dtype]) if dtypes[export_dtype] else None
        result.exported = export_weights(module, export, dtype=dtype)
    return result
