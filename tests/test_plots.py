"""carnet.plots.plot_curves (a run's curves.png, a pipeline's joined curves): honest axes on short runs, read from
the matplotlib figure rather than pixels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from carnet.plots import plot_curves


def visible_ticks(ax, axis: str = "x") -> list[float]:
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [float(t) for t in ticks if lo <= t <= hi]


def one_epoch() -> pd.DataFrame:
    return pd.DataFrame([{"epoch": 0, "train/acc": 0.095, "train/loss": 2.31, "val/acc": 0.1, "val/loss": 2.30}])


def test_one_epoch_curves_have_one_whole_epoch_and_accuracy_up_to_one(tmp_path: Path) -> None:
    fig = plot_curves(one_epoch(), tmp_path / "curves.png", title="run")
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        assert ax.get_xlim() == (-0.5, 0.5) and visible_ticks(ax) == [0.0]
    assert ax_acc.get_ylim() == (0.0, 1.0)   # not a 0.005-wide band around 0.1
    assert ax_loss.get_ylim()[0] == 0.0
    # the best epoch is in the legend, not a text on top of the line (or clipped at the edge)
    assert not [t for t in ax_acc.texts if "best" in t.get_text()]
    labels = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert labels == ["train", "val", "best val/acc 0.1000 (epoch 0)"]
    assert (tmp_path / "curves.png").stat().st_size > 5_000


def test_pipeline_curves_keep_phase_labels_and_whole_epochs(tmp_path: Path) -> None:
    accs = [0.62, 0.70, 0.74, 0.78, 0.80, 0.83, 0.84]
    metrics = pd.DataFrame({"epoch": range(7), "val/acc": accs, "val/loss": [1 - a for a in accs]})
    fig = plot_curves(metrics, tmp_path / "curves.png", boundaries=[(-0.5, "head"), (0.5, "unfreeze_half")])
    ax_acc, _ = fig.axes
    assert visible_ticks(ax_acc) == [float(e) for e in range(7)] and ax_acc.get_xlim() == (-0.5, 6.5)
    assert ax_acc.get_ylim() == (0.5, 1.0)
    assert [t.get_text().strip() for t in ax_acc.texts] == ["head", "unfreeze_half"]
    assert "best val/acc 0.8400 (epoch 6)" in [t.get_text() for t in ax_acc.get_legend().get_texts()]
