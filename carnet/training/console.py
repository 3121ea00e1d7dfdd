"""What a run prints: a Rich progress bar on a terminal and one line per epoch elsewhere (logs, CI, nohup), the model
summary without an empty FLOPs column, and none of Lightning's adverts or deprecation notes of its own internals.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table

from carnet.training.run_dir import RunArtifacts

# Lightning's messages that say nothing about the run: an advert, and notes about its own internals or about short
# runs (a dataset smaller than the logging interval is normal for small fine-tuning sets).
QUIET = ("try installing [litlogger]", "is smaller than the logging interval")


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
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.startswith("Total FLOPs"))
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

    def _get_train_description(self, current_epoch: int) -> str:
        """``Epoch 1/25`` for the first of 25: epochs counted from 1, as everything else carnet shows counts them
        (Lightning's bar says ``Epoch 0/24``)."""
        total = self.trainer.max_epochs
        description = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a mid-epoch resume, as Lightning's own bar does
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if trainer.global_step % self.metrics_every == 0:
            self._update_metrics(trainer, pl_module)
        self.refresh()


class EpochLines(pl.Callback):
    """One line per epoch, ``epoch N/M: train/loss ... (S s)``: always into the run's log file (train.log), and on
    stdout where there is no terminal to redraw a progress bar on (a Rich bar there wraps every epoch into a block of
    lines).

    The numbers are those of the epoch's row in metrics.csv (:class:`carnet.training.run_dir.RunArtifacts`, which
    Lightning calls first: build_trainer puts the console's callbacks last), epoch and seconds included, so that a
    line and its row say the same. A trainer without a RunArtifacts (the learning-rate finder's) has no lines.
    """

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = next((c for c in trainer.callbacks if isinstance(c, RunArtifacts)), None)
        if record is None or not record.rows or record.rows[-1]["epoch"] != trainer.current_epoch + 1:
            return
        row = record.rows[-1]
        shown = [f"{key} {row[key]:.4f}" for key in ("train/loss", "train/acc", "val/loss", "val/acc")
                 if row[key] == row[key]]  # NaN: not measured this epoch
        line = f"epoch {row['epoch']}/{trainer.max_epochs}: {'  '.join(shown)}  ({row['epoch_seconds']:.1f} s)"
        if self.echo:
            print(line, flush=True)
        log_to_files(line)


def log_to_files(message: str, level: int = logging.INFO, name: str = "carnet") -> None:
    """Put ``message`` in the run's log files only (Hydra's ``<job>.log``, train.log), as logger ``name``: the
    terminal shows it already (a printed line, a progress bar, the one-line error of ``exit_on_error``), and the
    log file then holds the whole run, what the terminal showed included."""
    record = logging.getLogger(name).makeRecord(name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def console_callbacks(progress: bool, summary: bool, metrics_every: int,
                      tty: bool | None = None) -> list[pl.Callback]:
    """The progress display and model summary of a run: Rich on a terminal, plain lines elsewhere; the epoch lines
    in the log file either way."""
    tty = sys.stdout.isatty() if tty is None else tty
    callbacks: list[pl.Callback] = []
    if progress and tty:
        callbacks.append(QuietProgressBar(metrics_every=metrics_every, leave=True))
    callbacks.append(EpochLines(echo=progress and not tty))
    if summary:
        callbacks.append(RichSummary() if tty else PlainSummary())
    return callbacks
