"""A run's curves.png (carnet.plots.plot_curves) and a pipeline's (carnet.training.phases.plot_pipeline): honest
axes on short runs, what was kept and what was thrown away, read from the matplotlib figure rather than pixels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from carnet.artifacts import EPOCH_COLUMNS, write_json
from carnet.plots import plot_curves
from carnet.summary import RunSummary
from carnet.training.phases import join_phases, plot_pipeline


def visible_ticks(ax, axis: str = "x") -> list[float]:
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [float(t) for t in ticks if lo <= t <= hi]


def one_epoch() -> pd.DataFrame:
    return pd.DataFrame([{"epoch": 1, "train/acc": 0.095, "train/loss": 2.31, "val/acc": 0.1, "val/loss": 2.30}])


def test_one_epoch_curves_have_one_whole_epoch_and_accuracy_up_to_one(tmp_path: Path) -> None:
    fig = plot_curves(one_epoch(), tmp_path / "curves.png", title="run")
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        assert ax.get_xlim() == (0.5, 1.5) and visible_ticks(ax) == [1.0]
    assert ax_acc.get_ylim() == (0.0, 1.0)   # not a 0.005-wide band around 0.1
    assert ax_loss.get_ylim()[0] == 0.0
    # the best epoch is in the legend, not a text on top of the line (or clipped at the edge)
    assert not [t for t in ax_acc.texts if "best" in t.get_text()]
    labels = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert labels == ["train", "val", "best val/acc 0.1000 (epoch 1)"]
    assert (tmp_path / "curves.png").stat().st_size > 5_000


def test_the_star_marks_best_ckpts_epoch_not_the_highest_accuracy(tmp_path: Path) -> None:
    """A run's best epoch is checkpoint.monitor's (val/loss): the star is there, as summary.json's best_epoch."""
    accs = [0.62, 0.70, 0.74, 0.78, 0.80, 0.83, 0.84]
    metrics = pd.DataFrame({"epoch": range(1, 8), "val/acc": accs, "val/loss": [1 - a for a in accs]})
    fig = plot_curves(metrics, tmp_path / "curves.png", best_epoch=5)
    ax_acc, _ = fig.axes
    assert visible_ticks(ax_acc) == [float(e) for e in range(1, 8)] and ax_acc.get_xlim() == (0.5, 7.5)
    assert ax_acc.get_ylim() == (0.5, 1.0)
    (star,) = [line for line in ax_acc.lines if line.get_marker() == "*"]
    assert list(star.get_xdata()) == [5] and star.get_label() == "best.ckpt, val/acc 0.8000 (epoch 5)"


def phase_run(folder: Path, accs: list[float], best_epoch: int, start_acc: float) -> Path:
    """A phase's run directory as RunArtifacts leaves it: metrics.csv, and summary.json with its start and best."""
    rows = [{"epoch": e, "val/acc": a, "val/loss": 1 - a, "train/acc": a, "train/loss": 1 - a}
            for e, a in enumerate(accs, 1)]
    folder.mkdir()
    pd.DataFrame(rows, columns=EPOCH_COLUMNS).to_csv(folder / "metrics.csv", index=False)
    summary = RunSummary(status="completed", epochs_run=len(accs), best_epoch=best_epoch,
                         start_val_acc=start_acc, start_val_loss=1 - start_acc, kept_start=best_epoch == 0)
    write_json(folder / "summary.json", summary.to_json())
    return folder


def test_pipeline_curves_mark_what_each_phase_handed_on_and_threw_away(tmp_path: Path) -> None:
    """head: best epoch 2 of 3; unfreeze_half: no epoch beat its start (kept_start); unfreeze_3q: best epoch 1 of 2.
    Each phase is drawn from its start where the previous one ended; the epochs not handed on are dotted, the
    hand-offs marked; accuracy from 0 to 1 (0.80 to 0.86 is a small gain, drawn small)."""
    runs = [("head", phase_run(tmp_path / "1", [0.80, 0.84, 0.83], 2, 0.5)),
            ("unfreeze_half", phase_run(tmp_path / "2", [0.82, 0.83], 0, 0.84)),
            ("unfreeze_3q", phase_run(tmp_path / "3", [0.86, 0.85], 1, 0.84))]
    joined, boundaries = join_phases(runs)
    assert boundaries == [(0, "head"), (3, "unfreeze_half"), (5, "unfreeze_3q")]
    assert list(joined["epoch"]) == [0, 1, 2, 3, 3, 4, 5, 5, 6, 7]
    assert list(joined["kept"]) == [True, True, True, False, True, False, False, True, True, False]

    fig = plot_pipeline(joined, boundaries, tmp_path / "curves.png")
    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_ylim() == (0.0, 1.0)
    thrown = [list(line.get_xdata()) for line in ax_acc.lines
              if line.get_linestyle() == ":" and line.get_color() == "tab:orange"]
    assert thrown == [[2, 3], [3, 4, 5], [6, 7]]  # from the last kept point, val/acc
    for ax in (ax_acc, ax_loss):
        (handed,) = [line for line in ax.lines if line.get_label() == "handed on"]
        assert list(handed.get_xdata()) == [2, 3, 6]
    assert [t.get_text().strip() for t in ax_acc.texts] == ["head", "unfreeze_half", "unfreeze_3q"]
    legend = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert legend == ["train", "val", "thrown away (not handed on)", "handed on"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
