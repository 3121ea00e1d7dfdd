"""Builders: config -> LightningModule, DataModule and Trainer (with carnet's callbacks and loggers).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint, ProgressBar
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from carnet.artifacts import atomic_path
from carnet.data.datamodule import CarDataModule
from carnet.errors import CarnetError
from carnet.models.network import use_compile_cache
from carnet.training.console import console_callbacks
from carnet.training.finetune import ProgressiveUnfreezing
from carnet.training.head_fit import HeadFit
from carnet.training.loggers import LogConfig
from carnet.training.module import CarClassifier
from carnet.training.phases import Phase
from carnet.training.resume import ResumeState
from carnet.training.run_dir import AtomicCheckpointIO


class WeightsCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the weights, carnet's metadata and hyper-parameters, without the optimizer state (for B6 and
    AdamW twice the weights again) that only a resume needs (``last.ckpt`` has it).

    Not Lightning's plain ``save_weights_only``: that skips the callbacks' ``on_save_checkpoint``, so with
    ``ema.decay`` the file would hold the raw weights instead of the average that validation chose. The whole
    checkpoint is built as usual (references, no copies), then the resume-only entries are left out.
    """

    RESUME_ONLY = ("optimizer_states", "lr_schedulers", "callbacks", "current_model_state", "averaging_state")

    def __init__(self, resume_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_weights_only=True, **kwargs)
        self.resume_from = Path(resume_from) if resume_from else None  # the last.ckpt a resumed run continues
        self.carried: Path | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed into a new folder keeps the best epoch so far: the stopped run's best.ckpt (beside the
        checkpoint it resumes from) comes along and stays the score to beat. Lightning keeps only its old path
        and would take the first resumed epoch as the best, so best.ckpt, summary.json's best epoch and a phase's
        hand-off would disagree."""
        previous = self.resume_from.parent if self.resume_from else None
        best = previous / Path(str(state_dict.get("best_model_path") or "")).name if previous else None
        here = Path(self.dirpath or "")
        if (best is not None and best.is_file() and state_dict.get("best_model_score") is not None
                and previous.resolve() != here.resolve()):
            self.carried = best
            mine = str(here / best.name)
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_path": mine, "kth_best_model_path": mine,
                          "best_k_models": {mine: state_dict["best_model_score"]}, "last_model_path": ""}
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.carried is not None and trainer.is_global_zero:
            with atomic_path(Path(self.best_model_path)) as tmp:
                shutil.copyfile(self.carried, tmp)
        self.carried = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for key in self.RESUME_ONLY:
            checkpoint.pop(key, None)
        trainer.strategy.save_checkpoint(checkpoint, filepath)
        trainer.strategy.barrier("WeightsCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


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


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra run (or sweep job) directory; ``cfg.run_dir`` when called outside ``@hydra.main``."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise CarnetError("no run directory: call train() from @hydra.main or set run_dir=PATH in the config")


def overrides_of(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run (for reports that compare runs)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
        callbacks.append(HeadFit(views=cfg.head_fit.views, folds=cfg.head_fit.folds,
                                 max_images=cfg.head_fit.get("max_images"), seed=cfg.seed))
    if cfg.ema.decay is not None:
        callbacks.append(EMAWeightAveraging(decay=float(cfg.ema.decay)))
    if cfg.get("unfreeze") is not None:
        schedule = OmegaConf.to_container(cfg.unfreeze) if OmegaConf.is_config(cfg.unfreeze) else cfg.unfreeze
        callbacks.append(ProgressiveUnfreezing(schedule, bn=cfg.bn))
    return callbacks


def steps_per_epoch(num_train: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch over ``num_train`` images (the loader drops a last partial batch)."""
    batches = num_train // batch_size if num_train > batch_size else 1
    return max(1, batches // max(1, accumulate))


def budget_epochs(num_train: int, batch_size: int, max_epochs: int, min_steps: int = 0, accumulate: int = 1) -> int:
    """Epochs for a run: ``max_epochs``, or more on small data so that it takes at least ``min_steps`` optimizer
    steps. Epochs alone do not scale: 50 photos at batch 32 are one step an epoch, 12,449 photos are 389."""
    per_epoch = steps_per_epoch(num_train, batch_size, accumulate)
    return max(int(max_epochs), math.ceil(int(min_steps or 0) / per_epoch))


def check_epochs(cfg: DictConfig) -> None:
    """``trainer.max_epochs`` must ask for training: with 0 (or Lightning's -1, endless) a run would end at once
    as ``completed`` with no checkpoint, and ``budget.min_steps`` plans epochs from it."""
    epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise CarnetError(f"trainer.max_epochs={epochs!r}: expected a whole number of epochs, at least 1")


def plan_budget(cfg: DictConfig, num_train: int, batch_size: int) -> dict[str, int]:
    """Set ``cfg.trainer.max_epochs`` from ``budget.min_steps`` (:func:`budget_epochs`); return the plan for
    summary.json."""
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    epochs = budget_epochs(num_train, batch_size, cfg.trainer.max_epochs, cfg.budget.min_steps, accumulate)
    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
    per_epoch = steps_per_epoch(num_train, batch_size, accumulate)
    return {"max_epochs": epochs, "steps_per_epoch": per_epoch, "planned_steps": epochs * per_epoch}


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` with carnet's checkpointing, progress bar and loggers."""
    monitor = None if cfg.get("refit_from") else cfg.checkpoint.monitor  # a refit validates nothing: its last epoch
    checkpoints = WeightsCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=cfg.checkpoint.mode,
        auto_insert_metric_name=False, enable_version_counter=False, resume_from=cfg.get("resume"),
    )
    # Not `save_last=True`: Lightning 2.6 rewrites last.ckpt only in epochs where the best improved, so it goes
    # stale and `resume=last.ckpt` would restart from an old epoch. An unmonitored callback writes it every epoch.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1,
                           enable_version_counter=False)
    callbacks = [checkpoints, last, ResumeState(cfg.seed, resume=cfg.get("resume")), *callbacks]
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
