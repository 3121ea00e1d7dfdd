"""The curves of a run's ``metrics.csv``: ``curves.png`` of a run and of a pipeline, and the axes that
``carnet-report`` shares with them.

Apart from :mod:`carnet.artifacts` because matplotlib takes seconds to import: the data layer (the image cache) and
predict use the run-directory writers and readers, and never draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def epoch_axis(ax: Axes, epochs: Iterable[float]) -> None:
    """Whole epochs on the x axis, half an epoch of room either side: a 1-epoch run is one point at epoch 0, not a
    -0.05..0.05 axis with fractional ticks."""
    values = [int(e) for e in epochs if e == e]  # NaN-free
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo <= 20:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(lo - 0.5, hi + 0.5)


def accuracy_axis(ax: Axes, values: Iterable[float]) -> None:
    """Accuracy from a floor on the 0.1 grid at least 0.05 below the lowest value, up to 1: a gap between runs or
    epochs is drawn at its real size (0.100 vs 0.107 does not fill the plot), and good runs still stand apart."""
    finite = [float(v) for v in values if v == v]
    lowest = min(finite, default=0.0)
    ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 10) / 10), 1.0)


def plot_curves(metrics: pd.DataFrame, path: str | os.PathLike, title: str = "", best_epoch: int | None = None
                ) -> Figure:
    """A run's curves.png: accuracy and loss per epoch, train and val, side by side. ``best_epoch`` (best.ckpt's,
    summary.json's) is starred; without it, the highest val/acc. Returns the (closed) figure, so that its axes can
    be read back. (A pipeline's: carnet.training.phases.plot_pipeline.)"""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    x = metrics["epoch"] if "epoch" in metrics else pd.Series(range(len(metrics)))
    for ax, name in ((ax_acc, "acc"), (ax_loss, "loss")):
        for split, style in (("train", "o-"), ("val", "s-")):
            column = f"{split}/{name}"
            if column in metrics and metrics[column].notna().any():
                ax.plot(x, metrics[column], style, label=split, markersize=3, clip_on=False)
        epoch_axis(ax, x)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    columns = [c for c in ("train/acc", "val/acc") if c in metrics]
    accuracy_axis(ax_acc, [v for c in columns for v in metrics[c]])
    losses = [float(v) for c in ("train/loss", "val/loss") if c in metrics for v in metrics[c] if v == v]
    if losses:
        ax_loss.set_ylim(0.0, max(max(losses) * 1.1, 1e-3))
    chosen = metrics.index[x == best_epoch] if best_epoch is not None else []
    if len(chosen) or (best_epoch is None and "val/acc" in metrics and metrics["val/acc"].notna().any()):
        # The best epoch as a marker with its value in the legend: a text beside the point would sit on the line or
        # be clipped at the axis' edge.
        best = chosen[0] if len(chosen) else metrics["val/acc"].idxmax()
        what = "best.ckpt, val/acc" if len(chosen) else "best val/acc"
        ax_acc.plot([x[best]], [metrics["val/acc"][best]], "*", color="tab:red", markersize=11, zorder=3,
                    clip_on=False, label=f"{what} {metrics['val/acc'][best]:.4f} (epoch {int(x[best])})")
    for ax in (ax_acc, ax_loss):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
