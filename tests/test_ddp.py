"""Scale-out: DDP with 2 CPU processes (gloo) and a sweep through the submitit local launcher. Both slow."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from carnet.models.checkpoint import read_checkpoint
from carnet.summary import read_summary
from tests.helpers.overrides import TINY
from tests.helpers.runs import run_script


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_epoch(train_run: Callable) -> None:
    run_dir, proc = train_run("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv")
    log = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    summary = read_summary(run_dir)
    assert summary.status == "completed" and summary.epochs_run == 1
    # Each of the 2 processes stepped through its half of the photos: the plan counted those steps (it counted all
    # the photos, twice the steps, before world_size); TINY's batch of 8 drops a partial last batch.
    assert summary.taken_steps == summary.planned_steps == math.ceil(summary.num_train / 2) // 8 >= 1
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 1 and metrics["val/acc"].notna().all()  # one row per epoch: rank 0 wrote alone
    assert summary.best_val_acc == pytest.approx(metrics["val/acc"].max())
    assert read_checkpoint(run_dir / "checkpoints" / "best.ckpt")["carnet"]["model_name"] == "test_efficientnet"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["strategy"] == "ddp"


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tiny_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    run_script("train.py", "-m", "hydra/launcher=submitit_local", f"data.root={tiny_data}", *TINY,
               "trainer.num_sanity_val_steps=0", f"hydra.sweep.dir={sweep_dir}",
               f"paths.output_dir={tmp_path / 'outputs'}", "seed=1,2", timeout=900)
    jobs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    assert [read_summary(job).status for job in jobs] == ["completed", "completed"]
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit
