"""The run directory's writer: ``metrics.csv`` after every epoch, ``curves.png`` and ``summary.json``.

``summary.json`` exists from a run's first moment with ``status: running`` and ends as ``completed`` or ``failed``,
so unfinished runs can be told apart. This callback is its only writer.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl

from carnet.artifacts import CURVES_FILE, EPOCH_COLUMNS, METRICS_FILE, SUMMARY_FILE, plot_curves, write_json


def _scalar(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


class RunArtifacts(pl.Callback):
    """Writes metrics.csv after every epoch, and curves.png + summary.json at the end of a run.

    ``summary`` starts with what the caller knows before training (model, image size, data counts, ...);
    this callback adds the results.
    """

    def __init__(self, run_dir: str | os.PathLike, summary: dict[str, Any], monitor: str = "val/acc",
                 mode: str = "max") -> None:
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode  # which epoch is "best": ModelCheckpoint's choice
        self.summary = dict(summary)
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        self.trainer: pl.Trainer | None = None

    def _callback_fields(self) -> dict[str, Any]:
        """Fields other callbacks report for summary.json (``summary_fields()``: the phase, the unfrozen fraction)."""
        fields: dict[str, Any] = {}
        for callback in self.trainer.callbacks if self.trainer is not None else []:
            if callback is not self and callable(getattr(callback, "summary_fields", None)):
                fields.update(callback.summary_fields())
        return fields

    def _write_summary(self, status: str, pl_module: pl.LightningModule | None = None) -> None:
        summary = {**self.summary, "status": status, "seconds": round(time.time() - self.started, 2)}
        metrics = pd.DataFrame(self.rows, columns=EPOCH_COLUMNS)
        if len(metrics) and metrics[self.monitor].notna().any():
            best = metrics[self.monitor].idxmin() if self.mode == "min" else metrics[self.monitor].idxmax()
            summary.update(best_val_acc=float(metrics["val/acc"][best]), best_epoch=int(metrics["epoch"][best]),
                           best_val_loss=float(metrics["val/loss"][best]))
        else:
            summary.update(best_val_acc=None, best_epoch=None, best_val_loss=None)
        summary["epochs_run"] = len(metrics)
        summary.update(self._callback_fields())  # last: a phase that kept its start weights reports that as best
        if pl_module is not None:
            summary["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            summary["total_params"] = sum(p.numel() for p in pl_module.parameters())
        self.summary = summary
        write_json(self.run_dir / SUMMARY_FILE, summary)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            self._write_summary("running", pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))  # a resumed run keeps its earlier epochs

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        self.rows.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train/loss": _scalar(metrics, "train/loss_epoch") if "train/loss_epoch" in metrics
            else _scalar(metrics, "train/loss"),
            "train/acc": _scalar(metrics, "train/acc"),
            "val/loss": _scalar(metrics, "val/loss"),
            "val/acc": _scalar(metrics, "val/acc"),
            "lr": groups[0]["lr"] if groups else math.nan,
            "lr_backbone": groups[1]["lr"] if len(groups) > 1 else math.nan,
            "seconds": round(time.time() - self.started, 2),
        })
        if trainer.is_global_zero:
            pd.DataFrame(self.rows, columns=EPOCH_COLUMNS).to_csv(self.run_dir / METRICS_FILE, index=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = pd.DataFrame(self.rows, columns=EPOCH_COLUMNS)
        if len(metrics):
            title = f"{self.summary.get('model', '')} @ {self.summary.get('image_size', '')} px"
            plot_curves(metrics, self.run_dir / CURVES_FILE, title=title)
        self._write_summary("completed", pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.summary["error"] = f"{type(exception).__name__}: {exception}"
            self._write_summary("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed", pl_module)
