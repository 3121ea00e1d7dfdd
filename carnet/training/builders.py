"""Builders: config -> LightningModule, DataModule and Trainer (with carnet's callbacks and loggers).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from carnet.config import plain
from carnet.data.datamodule import CarDataModule
from carnet.models.network import use_compile_cache
from carnet.runtime import Runtime
from carnet.training.checkpoints import AtomicCheckpointIO, checkpoint_callbacks
from carnet.training.console import console_callbacks
from carnet.training.ema import WeightEMA
from carnet.training.finetune import ProgressiveUnfreezing
from carnet.training.head_fit import HeadFit
from carnet.training.loggers import LogConfig
from carnet.training.module import CarClassifier
from carnet.training.phases import Phase
from carnet.training.resume import ResumeState
from carnet.training.seeding import SeedEachEpoch


def build_module(cfg: DictConfig, runtime: Runtime) -> CarClassifier:
    """The LightningModule for ``cfg`` (model, head, optimizer, scheduler), in the memory format, compiled and
    with the optimizer's kernel as ``runtime`` resolved them."""
    if runtime.compile and cfg.model.compile_cache:
        use_compile_cache(cfg.model.compile_cache)  # before the first compilation
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    if "fused" in optimizer:
        optimizer["fused"] = runtime.fused
    return CarClassifier(
        model_name=cfg.model.name,
        class_names=list(cfg.data.class_names),
        head=cfg.head,
        image_size=cfg.image_size,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
        drop_rate=cfg.model.drop_rate,
        drop_path_rate=cfg.model.drop_path_rate,
        channels_last=runtime.channels_last,
        compile=runtime.compile,
        compile_backend=cfg.model.compile_backend,
        optimizer=optimizer,
        scheduler=cfg.scheduler,
        backbone_lr_mult=cfg.backbone_lr_mult,
        layer_decay=cfg.layer_decay,
        label_smoothing=cfg.label_smoothing,
        mixup=OmegaConf.to_container(cfg.mixup, resolve=True),
        scales=list(cfg.model.scales),
    )


def build_datamodule(cfg: DictConfig, module: CarClassifier, runtime: Runtime) -> CarDataModule:
    """The DataModule for ``cfg``: the model's eval view (timm data config), loaders as ``runtime`` resolved them."""
    augment = OmegaConf.to_container(cfg.augment.train, resolve=True)
    return instantiate(cfg.data, image_size=cfg.image_size, seed=cfg.seed, augment=augment,
                       data_config=module.data_config, num_workers=runtime.num_workers, decode=runtime.decode,
                       pin_memory=runtime.pin_memory, _convert_="all")


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The fine-tuning callbacks of ``cfg``: its phase (``init_from`` weights in, best checkpoint out) and the
    unfreezing schedule. Built before the model, so a missing or mismatching predecessor phase fails fast."""
    callbacks: list[pl.Callback] = []
    if (phase := Phase.from_config(cfg)) is not None:
        callbacks.append(phase)
    if cfg.head_fit.enabled:
        callbacks.append(HeadFit(views=cfg.head_fit.views, folds=cfg.head_fit.folds,
                                 max_images=cfg.head_fit.max_images, pseudo_label=cfg.head_fit.pseudo_label,
                                 pad_batches=cfg.head_fit.pad_batches, seed=cfg.seed))
    if cfg.ema.decay is not None:
        callbacks.append(WeightEMA(decay=float(cfg.ema.decay)))
    if cfg.get("unfreeze") is not None:
        callbacks.append(ProgressiveUnfreezing(plain(cfg.unfreeze), bn=cfg.bn))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback], runtime: Runtime) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` with carnet's checkpointing, progress bar and loggers, its precision, cudnn
    benchmark and checkpoint writer as ``runtime`` resolved them."""
    monitor = None if cfg.get("refit_from") else cfg.checkpoint.monitor  # a refit validates nothing: its last epoch
    checkpoints = checkpoint_callbacks(run_dir / "checkpoints", monitor, cfg.checkpoint.mode,
                                       resume_from=cfg.get("resume"))
    callbacks = [*checkpoints, SeedEachEpoch(), ResumeState(resume=cfg.get("resume")), *callbacks]
    # A Rich bar on a terminal (metrics read at Lightning's logging cadence), one line per epoch elsewhere.
    callbacks += console_callbacks(progress=bool(cfg.trainer.enable_progress_bar),
                                   summary=bool(cfg.trainer.enable_model_summary),
                                   metrics_every=cfg.trainer.log_every_n_steps)
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c, save_dir=str(run_dir)) for c in (cfg.get("logger") or {}).values() if c is not None]
    if loggers:
        callbacks.append(LogConfig(cfg))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"], trainer_cfg["benchmark"] = runtime.precision, runtime.benchmark
    # Lightning adds its own bar and summary when enabled and none is given (as without a terminal, where EpochLines
    # prints), and says so when it finds ours: carnet's console callbacks stand for both settings.
    trainer_cfg["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    trainer_cfg["enable_model_summary"] = False
    # Atomic either way: in the background thread too, a checkpoint file is whole or absent. A failed background
    # write is raised by Lightning at the next save or at the end of fit, so it fails the run.
    checkpoint_io = AtomicCheckpointIO()
    if runtime.async_save:
        checkpoint_io = AsyncCheckpointIO(checkpoint_io)
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
                          plugins=[checkpoint_io])
    if (trainer.strategy.root_device.type == "cuda") != runtime.cuda:  # a bug in carnet.runtime.run_device
        raise RuntimeError(f"trainer.accelerator={cfg.trainer.accelerator} trains on {trainer.strategy.root_device}, "
                           f"but its auto values were resolved for {runtime.device}")
    if trainer.world_size != runtime.world_size:  # a bug in carnet.runtime.world_size: the budget counted others
        raise RuntimeError(f"trainer.devices={cfg.trainer.devices} trains in {trainer.world_size} processes, but the "
                           f"step budget was planned for {runtime.world_size}")
    return trainer
