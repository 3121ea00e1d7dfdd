"""What a run prints: a Rich progress bar on a terminal and one line per epoch elsewhere (logs, CI, nohup), the model
summary without an empty FLOPs column, and none of Lightning's adverts or deprecation notes of its own internals.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table

# Lightning's messages that say nothing about the run: an advert, notes about its own internals or about short
# runs (a dataset smaller than the logging interval is normal for small fine-tuning sets), and the accelerators a
# machine does not have (a CPU run hears "GPU available: False" and "TPU available: False" every time; a GPU run
# still says which GPU it found and whether it uses it).
QUIET = ("try installing [litlogger]", "is smaller than the logging interval", "GPU available: False",
         "TPU available: False", "to estimate number of stepping batches")


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in QUIET)


def quiet_lightning() -> None:
    """Drop Lightning's advert and internal notes from the log and the warnings (idempotent)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in target.filters):
            target.addFilter(_Quiet())
    # Lightning's pytree shim on torch >= 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
    # A resumed run writes into its own new folder by design (carnet.training.resume): not a problem to report.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


def _drop_empty_flops(summary_data: list[tuple[str, list[str]]], total_flops: int) -> list[tuple[str, list[str]]]:
    """FLOPs are counted only for a module with ``example_input_array``; without one the column is all zeros."""
    return [column for column in summary_data if total_flops or column[0] != "FLOPs"]


class PlainSummary(ModelSummary):
    """Lightning's text model summary, without the FLOPs column and total when nothing was counted."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *_drop_empty_flops(summary_data, total_flops))
        if not total_flops:  # the line reads "0         Total Flops"
            table = "\n".join(line for line in table.splitlines() if not line.lower().endswith("total flops"))
        logging.getLogger("pytorch_lightning.callbacks.model_summary").info("\n" + table)


class RichSummary(RichModelSummary):
    """Lightning's Rich model summary (on a terminal), without the FLOPs column when nothing was counted."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        RichModelSummary.summarize(_drop_empty_flops(summary_data, total_flops), total_parameters,
                                   trainable_parameters, model_size, total_training_modes, total_flops,
                                   **summarize_kwargs)


class QuietProgressBar(RichProgressBar):
    """Lightning's Rich bar, reading the logged metrics only every ``metrics_every`` steps and at the epoch's end.

    Reading them turns the step's loss into a Python float: on a GPU a device-to-host copy that waits for every
    queued kernel, once a step, so the GPU idles while Python launches the next step. The bar's position still
    moves every step (no read involved).
    """

    def __init__(self, metrics_every: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every = max(1, int(metrics_every))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a mid-epoch resume, as Lightning's own bar does
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if trainer.global_step % self.metrics_every == 0:
            self._update_metrics(trainer, pl_module)
        self.refresh()


class EpochLines(pl.Callback):
    """One line per epoch where there is no terminal to redraw a progress bar on (a Rich bar there wraps every epoch
    into a block of lines)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = []
        for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc"):
            if key in metrics:
                shown.append(f"{key.removesuffix('_epoch')} {float(metrics[key]):.4f}")
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {'  '.join(shown)}  "
              f"({time.time() - self.started:.1f} s)", flush=True)


def console_callbacks(progress: bool, summary: bool, metrics_every: int = 50,
                      tty: bool | None = None) -> list[pl.Callback]:
    """The progress display and model summary of a run: Rich on a terminal, plain lines elsewhere."""
    tty = sys.stdout.isatty() if tty is None else tty
    callbacks: list[pl.Callback] = []
    if progress:
        callbacks.append(QuietProgressBar(metrics_every=metrics_every, leave=True) if tty else EpochLines())
    if summary:
        callbacks.append(RichSummary() if tty else PlainSummary())
    return callbacks


class ShowFolder(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): a run or a sweep says where it writes, when it starts and when it
    ends, so that nobody has to look for the newest folder under ``outputs/`` or ``multirun/``. The end of a sweep
    also says how to compare its runs. Rank 0 only (DDP's other ranks rerun the script)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            print(f"run folder: {config.hydra.run.dir}", flush=True)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            print(f"run folder: {config.hydra.run.dir} (summary.json, metrics.csv, curves.png, checkpoints/)",
                  flush=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            print(f"sweep folder: {config.hydra.sweep.dir} (one run folder per job)", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            folder = config.hydra.sweep.dir
            print(f"sweep folder: {folder}; compare its runs: carnet-report {folder}", flush=True)


def _rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0
