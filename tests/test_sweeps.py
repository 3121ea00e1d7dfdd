"""Hydra multirun sweeps end to end: per-job run directories, the report over them, Optuna search, LR finder."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from carnet.summary import read_summary
from carnet.tools.report import find_runs, plot_runs, write_report
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.runs import run_script

Sweep = Callable[..., tuple[Path, subprocess.CompletedProcess]]


@pytest.fixture
def sweep(tiny_data: Path, tmp_path: Path) -> Sweep:
    """Run `train.py -m` on tiny_data with TINY settings plus overrides; return (sweep dir, process)."""

    def run(*overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
        sweep_dir = tmp_path / "multirun"
        proc = run_script("train.py", "-m", f"data.root={tiny_data}", *TINY, "trainer.num_sanity_val_steps=0",
                          f"hydra.sweep.dir={sweep_dir}", f"paths.output_dir={tmp_path / 'outputs'}", *overrides,
                          timeout=600)
        return sweep_dir, proc

    return run


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/summary.json"))


def test_multirun_2x2_gives_four_runs_and_a_ranked_report(sweep: Sweep) -> None:
    sweep_dir, _ = sweep("optimizer=adam,sgd", "head=linear,mlp")
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    tried = set()
    for job in jobs:
        summary = read_summary(job)
        assert summary.status == "completed" and summary.run_dir == str(job)
        assert (job / "metrics.csv").is_file() and (job / "checkpoints" / "best.ckpt").is_file()
        config = yaml.safe_load((job / "config.yaml").read_text())
        tried.add((config["optimizer"]["_target_"], config["head"]["_target_"]))
        # phase hand-offs stay inside the job: two jobs of one sweep never share a phases/<phase>.ckpt
        assert config["paths"]["phases"] == str(job / "phases")
    assert len(tried) == 4

    frame = write_report(sweep_dir)
    assert len(frame) == 4
    accs = list(frame["best_val_acc"])
    assert accs == sorted(accs, reverse=True)
    assert sorted(accs) == sorted(read_summary(job).best_val_acc for job in jobs)
    assert {"optimizer", "head"} <= set(frame.columns) and "data.root" not in frame.columns
    rows = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # header + 4 runs
    assert (sweep_dir / "report.png").is_file()
    # TINY runs one epoch: the plot shows epoch 1 alone, accuracy up to 1, runs named by what they tried
    (ax,) = plot_runs(find_runs(sweep_dir), sweep_dir / "report.png").axes
    assert ax.get_xlim() == (0.5, 1.5) and [t for t in ax.get_xticks() if 0.5 <= t <= 1.5] == [1]
    assert ax.get_ylim()[1] == 1.0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 4 and all(label.replace("best: ", "").startswith("optimizer=") and " head=" in label
                                    for label in labels), labels


def test_single_run_phases_dir_is_shared_under_output_dir(tmp_path: Path) -> None:
    cfg = compose_cfg([f"paths.output_dir={tmp_path}"])
    assert cfg.paths.phases == f"{tmp_path}/phases"


@pytest.mark.slow
def test_optuna_search_best_value_is_the_best_run(sweep: Sweep) -> None:
    sweep_dir, _ = sweep("hparams_search=optuna", "hydra.sweeper.n_trials=3")
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(read_summary(job).best_val_acc for job in jobs)
    assert results["best_value"] == pytest.approx(best)
    assert set(results["best_params"]) >= {"optimizer", "optimizer.lr", "optimizer.weight_decay", "scheduler",
                                           "head", "augment", "label_smoothing"}
    # every trial recorded what it tried, for the report
    assert all(any(o.startswith("optimizer.lr=") for o in read_summary(job).overrides) for job in jobs)
    assert len(write_report(sweep_dir)) == 3
    assert f"Optuna best value {results['best_value']}" in (sweep_dir / "report.md").read_text()


def test_optuna_search_space_composes() -> None:
    cfg = compose_cfg(["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(sweeper.params) == {"optimizer", "optimizer.lr", "optimizer.weight_decay", "scheduler", "head",
                                   "augment", "label_smoothing"}


@pytest.mark.slow
def test_lr_find_writes_plot_and_a_positive_rate(train_run: Callable, tmp_path: Path) -> None:
    run_dir, proc = train_run("tune=lr_find", "tune.num_training=24")
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert result["suggested_lr"] > 0 and result["steps"] == 24
    assert f"suggested lr={result['suggested_lr']:.3g}" in proc.stdout
    assert (run_dir / "lr_find.png").stat().st_size > 10_000
    assert not (run_dir / "checkpoints").exists()  # no training
    summary = read_summary(run_dir)  # every run directory has one: this run completed, found a rate, trained nothing
    assert summary.status == "completed" and summary.tune["suggested_lr"] == result["suggested_lr"]
    assert not {"lr", "loss"} & set(summary.tune)  # the curve's points stay in lr_find.json
    assert summary.best_val_acc is None
    assert not list(run_dir.glob(".lr_find*.ckpt"))  # the finder's temporary checkpoint is gone
