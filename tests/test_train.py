"""Real `train.py` runs on tiny generated data: the run-directory contract and reproducibility."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from carnet.artifacts import EPOCH_COLUMNS
from carnet.models.checkpoint import load_checkpoint, read_checkpoint
from carnet.runtime import resolve_runtime
from carnet.summary import read_summary
from carnet.training.builders import build_trainer
from carnet.training.checkpoints import AtomicCheckpointIO
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env


def test_one_epoch_run_leaves_every_artifact(train_run):
    run_dir, proc = train_run("trainer.max_epochs=2")
    for name in ("config.yaml", "metrics.csv", "curves.png", "split.csv", "summary.json",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    for key in ("best_val_acc", "best_epoch", "epochs_run", "trainable_params", "total_params", "model",
                "image_size", "seconds"):
        assert summary[key] is not None, key
    assert summary["epochs_run"] == 2 and summary["image_size"] == 64 and summary["model"] == "test_efficientnet"
    assert summary["trainable_params"] == summary["total_params"] > 0

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == EPOCH_COLUMNS and list(metrics.epoch) == [1, 2]
    assert metrics[["train/loss", "train/acc", "val/loss", "val/acc", "lr"]].notna().all().all()
    assert summary["max_val_acc"] == metrics["val/acc"].max()
    best = metrics[metrics["val/loss"] == metrics["val/loss"].min()].iloc[0]  # checkpoint.monitor: val/loss
    assert (summary["best_epoch"], summary["best_val_acc"]) == (best.epoch, best["val/acc"])
    assert (f"best.ckpt: epoch {summary['best_epoch']} of 2 (lowest val/loss), val/acc={summary['best_val_acc']:.4f} "
            f"val/loss={summary['best_val_loss']:.4f}") in proc.stdout
    # the run's folder holds the files docs/runs.md's table describes, and only those (no lock left behind)
    assert {p.name for p in run_dir.iterdir()} == {"summary.json", "metrics.csv", "checkpoints", "curves.png",
                                                  "split.csv", "config.yaml", ".hydra", "train.log"}
    table = (REPO / "docs" / "runs.md").read_text().split("## The run directory", 1)[1].split("\n\n#", 1)[0]
    documented = {name.split("/")[0] for line in table.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    assert {p.name for p in run_dir.iterdir()} <= documented

    split = pd.read_csv(run_dir / "split.csv")
    val = split[split.split == "val"]
    assert len(split) == 40 and len(val) == summary["num_val"] and set(val.label) == set(range(10))

    net, meta = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert meta["image_size"] == 64 and len(meta["class_names"]) == 10
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert (run_dir / "curves.png").stat().st_size > 10_000


@pytest.mark.slow  # ~17 s on 2 cores (two runs); test_resume's runs repeat one too. Keeps `make test` under 10 min
def test_same_seed_same_result(train_run, tmp_path):
    """Augmentation in loader workers included: the same seed on the CPU repeats a run exactly."""
    args = ("trainer.max_epochs=2", "data.num_workers=2", "seed=5")
    first, _ = train_run(*args, run_dir=tmp_path / "a")
    second, _ = train_run(*args, run_dir=tmp_path / "b")
    a, b = pd.read_csv(first / "metrics.csv"), pd.read_csv(second / "metrics.csv")
    columns = ["train/loss", "train/acc", "val/loss", "val/acc"]
    assert a[columns].equals(b[columns])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (first, second)]
    assert summaries[0]["best_val_acc"] == summaries[1]["best_val_acc"]


def test_our_errors_are_one_line_and_exit_1(tmp_path):
    """A CarnetError (here: no data folder) is one line on stderr and exit status 1, not a Hydra traceback."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"data.root={tmp_path / 'nowhere'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: data root") and "nowhere" in last, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_best_checkpoint_is_weights_and_metadata_last_keeps_the_optimizer(tiny_data: Path, tmp_path: Path) -> None:
    """best.ckpt (phase hand-off, predict, serve, export) has no optimizer state (B6 + AdamW: 3x the weights);
    it still has carnet's metadata and the weights callbacks checkpoint (EMA's average); last.ckpt resumes."""
    train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", "ema.decay=0.5", f"run_dir={tmp_path}"]))
    best = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not {"optimizer_states", "lr_schedulers", "callbacks", "current_model_state"} & set(best)
    assert {"optimizer_states", "lr_schedulers", "callbacks", "current_model_state"} <= set(last)
    assert best["carnet"]["model_name"] == "test_efficientnet" and best["carnet"]["image_size"] == 64
    assert best["state_dict"].keys() == last["state_dict"].keys()  # one epoch: best is the last, EMA-averaged
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())
    net, _ = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 10)


@pytest.mark.parametrize(("setting", "wrapped"), [("auto", False), ("false", False), ("true", True)])
def test_async_save_wraps_the_atomic_writer(setting: str, wrapped: bool, tmp_path: Path) -> None:
    """checkpoint.async_save: auto is synchronous on the CPU (GPU runs only); true writes in a thread, still
    through the atomic writer."""
    cfg = compose_cfg([*TINY, f"checkpoint.async_save={setting}"])
    trainer = build_trainer(cfg, tmp_path, [], resolve_runtime(cfg))
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO) is wrapped
    assert isinstance(io.checkpoint_io if wrapped else io, AtomicCheckpointIO)


def test_async_checkpoints_are_whole_and_a_failed_write_fails_the_run(tiny_data: Path, tmp_path: Path) -> None:
    common = [*ONE_BATCH, f"data.root={tiny_data}", "checkpoint.async_save=true", "trainer.max_epochs=2"]
    train(compose_cfg([*common, f"run_dir={tmp_path / 'ok'}"]))
    assert sorted(p.name for p in (tmp_path / "ok" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert read_checkpoint(tmp_path / "ok" / "checkpoints" / "last.ckpt")["epoch"] == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoints").write_text("a file where the checkpoint folder goes: every write fails")
    with pytest.raises(OSError):
        train(compose_cfg([*common, f"run_dir={broken}"]))
    assert read_summary(broken).status == "failed"
