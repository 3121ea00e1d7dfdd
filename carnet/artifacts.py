"""The run directory's contract: ``metrics.csv`` (one row per epoch), ``curves.png`` and ``summary.json``.

Every later tool (phases, reports, sweeps, predict) reads these files, never a logger's internals, so they are
written by carnet whatever loggers a run uses. ``summary.json`` exists from a run's first moment with
``status: running`` and ends as ``completed`` or ``failed``, so unfinished runs can be told apart.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
import pytorch_lightning as pl

METRICS_FILE, CURVES_FILE, SUMMARY_FILE, SPLIT_FILE = "metrics.csv", "curves.png", "summary.json", "split.csv"
EPOCH_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "lr_backbone", "seconds"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temporary file in the same folder + rename: a reader never sees half a file, and a
    failed write leaves the previous file (if any) as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write JSON atomically: a reader never sees half a summary."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame as CSV (no index) atomically."""
    return write_text_atomic(path, frame.to_csv(index=False))


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's summary.json as a dict (a clear error if the run has none)."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a carnet run directory")
    return json.loads(path.read_text())


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's per-epoch metrics.csv (empty frame with the standard columns if no epoch finished)."""
    path = Path(run_dir) / METRICS_FILE
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=EPOCH_COLUMNS)


def plot_curves(metrics: pd.DataFrame, path: str | os.PathLike, title: str = "",
                boundaries: list[tuple[float, str]] | None = None) -> None:
    """Accuracy and loss per epoch, train and val, side by side; optional labelled vertical boundaries."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    x = metrics["epoch"] if "epoch" in metrics else range(len(metrics))
    for ax, name in ((ax_acc, "acc"), (ax_loss, "loss")):
        for split, style in (("train", "o-"), ("val", "s-")):
            column = f"{split}/{name}"
            if column in metrics and metrics[column].notna().any():
                ax.plot(x, metrics[column], style, label=split, markersize=3)
        for position, label in boundaries or []:
            ax.axvline(position, color="grey", linestyle="--", linewidth=0.8)
            ax.text(position, 1.0, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if "val/acc" in metrics and metrics["val/acc"].notna().any():
        best = metrics["val/acc"].idxmax()
        ax_acc.annotate(f"best {metrics['val/acc'][best]:.4f}", (x[best], metrics["val/acc"][best]),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scalar(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


class RunArtifacts(pl.Callback):
    """Writes metrics.csv after every epoch, and curves.png + summary.json at the end of a run.

    ``summary`` starts with what the caller knows before training (model, image size, data counts, ...);
    this callback adds the results.
    """

    def __init__(self, run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.summary = dict(summary)
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()

    def _write_summary(self, status: str, pl_module: pl.LightningModule | None = None) -> None:
        summary = {**self.summary, "status": status, "seconds": round(time.time() - self.started, 2)}
        metrics = pd.DataFrame(self.rows, columns=EPOCH_COLUMNS)
        if len(metrics) and metrics["val/acc"].notna().any():
            best = metrics["val/acc"].idxmax()
            summary.update(best_val_acc=float(metrics["val/acc"][best]), best_epoch=int(metrics["epoch"][best]),
                           best_val_loss=float(metrics["val/loss"][best]))
        else:
            summary.update(best_val_acc=None, best_epoch=None, best_val_loss=None)
        summary["epochs_run"] = len(metrics)
        if pl_module is not None:
            summary["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            summary["total_params"] = sum(p.numel() for p in pl_module.parameters())
        self.summary = summary
        write_json(self.run_dir / SUMMARY_FILE, summary)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
