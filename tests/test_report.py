"""carnet.tools.report on hand-made run directories: ranking, differing overrides, unfinished runs, files written."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from carnet.artifacts import EPOCH_COLUMNS, write_json
from carnet.summary import RunSummary
from carnet.tools.report import differing_keys, find_runs, main, parse_overrides, write_report


def make_run(path: Path, status: str, accs: list[float], overrides: list[str]) -> Path:
    """A run directory as RunArtifacts writes it: metrics.csv (one row per epoch) and summary.json."""
    path.mkdir(parents=True)
    rows = [{"epoch": i, "step": i, "val/acc": a, "val/loss": 1 - a} for i, a in enumerate(accs, 1)]
    pd.DataFrame(rows, columns=EPOCH_COLUMNS).to_csv(path / "metrics.csv", index=False)
    best = max(accs) if accs and status == "completed" else None
    summary = RunSummary(status=status, best_val_acc=best, epochs_run=len(accs), seconds=12.0, overrides=overrides,
                         best_epoch=accs.index(best) + 1 if best is not None else None)
    write_json(path / "summary.json", summary.to_json())
    return path


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    common = ["data.root=/data/cars", "hydra.run.dir=x", "model=test_efficientnet"]
    make_run(root / "0", "completed", [0.5, 0.7, 0.6], [*common, "optimizer=adam", "head=linear"])
    make_run(root / "1", "completed", [0.6, 0.9], [*common, "optimizer=sgd", "head=linear"])
    make_run(root / "2", "failed", [0.3], [*common, "optimizer=adam", "head=mlp"])
    make_run(root / "3", "running", [], [*common, "optimizer=sgd", "head=mlp"])
    make_run(root / "nested" / "4", "completed", [0.8], [*common, "optimizer=adamw", "head=linear"])
    return root


def test_parse_overrides() -> None:
    assert parse_overrides(["a=1", "+b.c=x=y", "~d"]) == {"a": "1", "b.c": "x=y", "d": "<deleted>"}


def test_report_ranks_runs_and_keeps_unfinished(runs_dir: Path) -> None:
    frame = write_report(runs_dir)
    assert list(frame["run"]) == ["1", "nested/4", "0", "2", "3"]
    assert list(frame["status"]) == ["completed", "completed", "completed", "failed", "running"]
    assert list(frame["best_val_acc"][:3]) == [0.9, 0.8, 0.7]
    assert frame["best_val_acc"][3] == pytest.approx(0.3)  # best so far of the failed run, still listed
    assert pd.isna(frame["best_val_acc"][4])               # running run without an epoch yet
    # only the overrides that differ are columns (not the data root, the run dir or the shared model)
    assert differing_keys(find_runs(runs_dir)) == ["optimizer", "head"]
    assert {"optimizer", "head"} <= set(frame.columns)
    assert not {"data.root", "hydra.run.dir", "model"} & set(frame.columns)

    markdown = (runs_dir / "report.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(table_rows) == 5
    assert table_rows[0].startswith("| 1 | 1 | completed | 0.9000")
    assert "| failed |" in table_rows[3] and "| running |" in table_rows[4]
    assert (runs_dir / "report.png").stat().st_size > 10_000


def test_cli_writes_to_out_and_rejects_empty_dirs(runs_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main([str(runs_dir), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert "nested/4" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_refuses_an_out_it_cannot_write_in_one_line(runs_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A file for --out was a FileExistsError traceback; a folder that cannot be made names it."""
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(SystemExit) as stopped:
        main([str(runs_dir), "--out", str(taken)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"carnet-report: error: --out {taken} is a file; expected a folder for report.md and report.png")
    assert main([str(runs_dir), "--out", str(taken / "inside")]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write {taken / 'inside'} (Not a directory)"
    assert taken.read_text() == "a file"


def visible_ticks(ax, axis: str = "x") -> list[float]:
    """The tick values matplotlib draws inside the axis' limits."""
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [float(t) for t in ticks if lo <= t <= hi]


def test_one_epoch_sweep_plot_has_honest_axes_and_names_runs_by_overrides(tmp_path: Path) -> None:
    """A 1-epoch sweep of two learning rates: epoch 1 alone on the x axis, accuracy up to 1 (a 0.007 gap must not
    fill the plot), each run named by the override that differs."""
    from carnet.tools.report import plot_runs

    root = tmp_path / "sweep"
    common = ["data.root=/data/cars", "model=test_efficientnet"]
    make_run(root / "0", "completed", [0.100], [*common, "optimizer.lr=0.01"])
    make_run(root / "1", "completed", [0.107], [*common, "optimizer.lr=0.001"])
    fig = plot_runs(find_runs(root), tmp_path / "report.png")
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.5, 1.5) and visible_ticks(ax) == [1.0]
    bottom, top = ax.get_ylim()
    assert (bottom, top) == (0.0, 1.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["best: optimizer.lr=0.001 (0.1070)", "optimizer.lr=0.01 (0.1000)"]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_plot_epochs_are_whole_numbers(runs_dir: Path, tmp_path: Path) -> None:
    from carnet.tools.report import plot_runs

    fig = plot_runs(find_runs(runs_dir), tmp_path / "report.png")
    (ax,) = fig.axes
    assert visible_ticks(ax) == [1.0, 2.0, 3.0] and ax.get_xlim() == (0.5, 3.5)
    assert ax.get_ylim() == (0.2, 1.0)  # lowest accuracy 0.3: a floor on the 0.1 grid below it, up to 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "best: optimizer=sgd head=linear (0.9000)"
    assert "optimizer=adam head=mlp (0.3000) [failed]" in labels


def test_the_report_says_when_the_best_run_is_within_noise(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Two chance-level runs of 10 classes on 29 validation photos (issue 23 item 5: the report called one of them
    "best" without a word); two runs far apart on 300 photos get no such note."""
    import json

    import yaml

    def runs(root: Path, accs: tuple[float, float], num_val: int) -> Path:
        for i, acc in enumerate(accs):
            run = make_run(root / str(i), "completed", [acc], [f"optimizer.lr={10 ** -(i + 2)}"])
            summary = json.loads((run / "summary.json").read_text())
            write_json(run / "summary.json", {**summary, "num_val": num_val})
            (run / "config.yaml").write_text(yaml.safe_dump({"data": {"class_names": [f"car {k}" for k in range(10)]}}))
        return root

    close = runs(tmp_path / "close", (0.1724, 0.1379), 29)
    write_report(close)
    said = capsys.readouterr().out
    note = next(line for line in said.splitlines() if line.startswith("Within noise"))
    assert "not above chance level (10 classes: 0.1000)" in note and "differ by 0.0345" in note
    assert "validation photos would tell them apart" in note
    assert note in (close / "report.md").read_text()

    write_report(runs(tmp_path / "apart", (0.95, 0.60), 300))
    assert "Within noise" not in capsys.readouterr().out
