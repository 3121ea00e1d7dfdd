"""Builders: config -> LightningModule, DataModule and Trainer (with carnet's callbacks and loggers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EMAWeightAveraging, ProgressBar
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from carnet.config import plain
from carnet.data.datamodule import CarDataModule
from carnet.errors import CarnetError
from carnet.models.network import use_compile_cache
from carnet.training.checkpoints import AtomicCheckpointIO, checkpoint_callbacks
from carnet.training.console import console_callbacks
from carnet.training.finetune import ProgressiveUnfreezing
from carnet.training.head_fit import HeadFit
from carnet.training.loggers import LogConfig
from carnet.training.module import CarClassifier
from carnet.training.phases import Phase
from carnet.training.resume import ResumeState
from carnet.training.seeding import SeedEachEpoch


def gpu_run(accelerator: str) -> bool:
    """Whether a run with ``trainer.accelerator`` trains on a CUDA GPU: what every ``auto`` default below asks."""
    return accelerator != "cpu" and torch.cuda.is_available()


def resolve_async_save(async_save: Any, accelerator: str) -> bool:
    """``auto``: checkpoints written in a background thread for GPU runs (the GPU goes on training meanwhile);
    on the CPU the thread would only compete with training for the same cores."""
    if str(async_save).lower() == "auto":
        return gpu_run(accelerator)
    if isinstance(async_save, bool):
        return async_save
    raise CarnetError(f"checkpoint.async_save={async_save!r}: expected true, false or auto")


def resolve_precision(precision: Any, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32 on the CPU."""
    if str(precision) != "auto":
        return str(precision)
    if not gpu_run(accelerator):
        return "32"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_benchmark(benchmark: Any, accelerator: str) -> bool:
    """``null``: cudnn.benchmark (fastest conv algorithms for fixed input shapes) on for GPU runs only."""
    if benchmark is not None:
        return bool(benchmark)
    return gpu_run(accelerator)


def resolve_compile(compile_: Any, accelerator: str) -> bool | str:
    """``model.compile`` -> False (eager), True (the whole network) or ``"regional"`` (each backbone block: a
    fraction of the whole network's warm-up, carnet.models.network.compile_network). ``auto``: regional for GPU
    runs, eager on the CPU (there compiling costs more than it saves in short runs)."""
    if str(compile_).lower() == "auto":
        return "regional" if gpu_run(accelerator) else False
    if isinstance(compile_, bool) or compile_ is None:
        return bool(compile_)
    if str(compile_).lower() == "regional":
        return "regional"
    raise CarnetError(f"model.compile={compile_!r}: expected true, false, regional or auto")


def build_module(cfg: DictConfig) -> CarClassifier:
    """The LightningModule for ``cfg`` (model, head, optimizer, scheduler)."""
    compile_ = resolve_compile(cfg.model.get("compile", False), str(cfg.trainer.get("accelerator", "auto")))
    if compile_ and cfg.model.get("compile_cache"):
        use_compile_cache(cfg.model.compile_cache)  # before the first compilation
    return CarClassifier(
        model_name=cfg.model.name,
        class_names=list(cfg.data.class_names),
        head=cfg.head,
        image_size=cfg.image_size,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
        drop_rate=cfg.model.drop_rate,
        drop_path_rate=cfg.model.drop_path_rate,
        channels_last=cfg.model.channels_last,
        compile=compile_,
        compile_backend=cfg.model.get("compile_backend", "inductor"),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        backbone_lr_mult=cfg.backbone_lr_mult,
        label_smoothing=cfg.label_smoothing,
    )


def build_datamodule(cfg: DictConfig, module: CarClassifier) -> CarDataModule:
    """The DataModule for ``cfg``, normalised as the model expects (timm data config)."""
    augment = OmegaConf.to_container(cfg.augment.train, resolve=True)
    return instantiate(cfg.data, image_size=cfg.image_size, seed=cfg.seed, augment=augment,
                       data_config=module.data_config, _convert_="all")


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The fine-tuning callbacks of ``cfg``: its phase (``init_from`` weights in, best checkpoint out) and the
    unfreezing schedule. Built before the model, so a missing or mismatching predecessor phase fails fast."""
    callbacks: list[pl.Callback] = []
    if (phase := Phase.from_config(cfg)) is not None:
        callbacks.append(phase)
    if cfg.head_fit.enabled:
        callbacks.append(HeadFit(views=cfg.head_fit.views, folds=cfg.head_fit.folds))
    if cfg.ema.decay is not None:
        callbacks.append(EMAWeightAveraging(decay=float(cfg.ema.decay)))
    if cfg.get("unfreeze") is not None:
        callbacks.append(ProgressiveUnfreezing(plain(cfg.unfreeze), bn=cfg.bn))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` with carnet's checkpointing, progress bar and loggers."""
    checkpoints = checkpoint_callbacks(run_dir / "checkpoints", cfg.checkpoint.monitor, cfg.checkpoint.mode,
                                       resume_from=cfg.get("resume"))
    callbacks = [*checkpoints, SeedEachEpoch(), ResumeState(resume=cfg.get("resume")), *callbacks]
    # A Rich bar on a terminal (metrics read at Lightning's logging cadence), one line per epoch elsewhere.
    callbacks += console_callbacks(progress=bool(cfg.trainer.get("enable_progress_bar", True)),
                                   summary=bool(cfg.trainer.get("enable_model_summary", True)),
                                   metrics_every=cfg.trainer.get("log_every_n_steps") or 50)
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c, save_dir=str(run_dir)) for c in (cfg.get("logger") or {}).values() if c is not None]
    if loggers:
        callbacks.append(LogConfig(cfg))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"),
                                                 str(trainer_cfg.get("accelerator", "auto")))
    # Lightning adds its own bar when enabled and none is given (as without a terminal, where EpochLines prints).
    trainer_cfg["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    trainer_cfg["benchmark"] = resolve_benchmark(trainer_cfg.get("benchmark"), str(trainer_cfg.get("accelerator")))
    # Atomic either way: in the background thread too, a checkpoint file is whole or absent. A failed background
    # write is raised by Lightning at the next save or at the end of fit, so it fails the run.
    checkpoint_io = AtomicCheckpointIO()
    if resolve_async_save(cfg.checkpoint.get("async_save", "auto"), str(trainer_cfg.get("accelerator", "auto"))):
        checkpoint_io = AsyncCheckpointIO(checkpoint_io)
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                       default_root_dir=str(run_dir), plugins=[checkpoint_io])
