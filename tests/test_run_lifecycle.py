"""A run's life in its directory: one owner at a time, a summary whatever happens (failed before or during
training, killed outright), checkpoints that are whole or absent, and a resume that continues the same run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from carnet.artifacts import read_metrics, write_json
from carnet.models.checkpoint import read_checkpoint
from carnet.summary import read_summary
from carnet.training.run_dir import run_dir_lock
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env


def _train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_busy_run_dir_stops_and_touches_nothing(tiny_data: Path, tmp_path: Path) -> None:
    """Not even Hydra's files: .hydra/ (which it used to rewrite with the refused run's config) and train.log."""
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):  # a live run owns the folder
        write_json(run_dir / "summary.json", {"status": "running", "model": "the first run's"})
        (run_dir / ".hydra").mkdir()
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (run_dir / ".hydra" / name).write_text("seed: 42\n")
        before = _files(run_dir)
        proc = _train_py(f"data.root={tiny_data}", *ONE_BATCH, "seed=7", f"hydra.run.dir={run_dir}")
        after = _files(run_dir)  # while the owner lives (it removes its .lock as it ends)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert f"run directory {run_dir} is in use by another run (pid {os.getpid()})" in proc.stderr
    assert after == before


def test_the_lock_file_goes_with_the_run_and_one_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    """The flock, not the file, says a run lives: the file is removed when the run ends, and one a killed run left
    (no process holds its lock) is no obstacle."""
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (run_dir / ".lock").exists()
    (run_dir / ".lock").write_text("99999999\n")  # what kill -9 leaves
    with run_dir_lock(run_dir):
        assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert list(run_dir.iterdir()) == []


def test_default_run_dirs_differ_within_a_second() -> None:
    """Two runs started in the same second get their own folders (Hydra's `now` at one-second resolution did not)."""
    dirs = []
    for _ in range(2):
        GlobalHydra.instance().clear()
        cfg = compose_cfg([], return_hydra_config=True)
        dirs.append(OmegaConf.select(cfg, "hydra.run.dir"))
    assert dirs[0] != dirs[1]


def test_a_failure_before_training_leaves_a_failed_summary_and_a_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _train_py(f"data.root={tmp_path / 'missing'}", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    summary = read_summary(run_dir)
    assert summary.status == "failed"
    assert f"data root {tmp_path / 'missing'} does not exist" in summary.error
    assert "does not exist" in (run_dir / "train.log").read_text()


def test_the_data_is_checked_before_the_model_is_built(tmp_path: Path) -> None:
    """A wrong data.root fails at once, before the default model (B6, pretrained) is built or downloaded: with an
    unreachable hub it would otherwise fail on the weights, after a long wait. (The data's error, not the weights',
    and no parameter count in the summary: nothing was built.)"""
    run_dir = tmp_path / "run"
    proc = _train_py(f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={run_dir}", "trainer=cpu")
    assert proc.returncode == 1 and "data root" in proc.stderr and "does not exist" in proc.stderr
    assert read_summary(run_dir).total_params is None


def test_a_killed_run_reads_as_interrupted(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"data.root={tiny_data}", *TINY,
                             "trainer.max_epochs=50", f"hydra.run.dir={run_dir}"], cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "summary.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read_summary(run_dir).status == "running"  # alive: its own pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    summary = read_summary(run_dir)
    assert summary.status == "interrupted" and summary.pid == proc.pid


def test_a_full_disk_leaves_whole_checkpoints_and_a_failed_summary(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the second epoch's checkpoint is written: the first epoch's last.ckpt survives whole
    (Lightning wrote in place: a truncated file), and the summary says why the run stopped."""
    import lightning_fabric.plugins.io.torch_io as torch_io

    real_save, calls = torch_io._atomic_save, []

    def save_until_the_disk_fills(checkpoint: dict, path: str) -> None:
        calls.append(path)
        if len(calls) <= 2:  # epoch 0: best.ckpt and last.ckpt
            return real_save(checkpoint, path)
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(torch_io, "_atomic_save", save_until_the_disk_fills)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", "trainer.max_epochs=3", f"run_dir={run_dir}"]))
    summary = read_summary(run_dir)
    assert summary.status == "failed" and "No space left on device" in summary.error
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary files left
    assert read_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0


def test_resume_continues_the_run_as_if_never_stopped(tiny_data: Path, tmp_path: Path) -> None:
    """Stopped after 2 of 3 epochs and resumed with `resume=` (as the README writes it) into a new folder: the
    same epochs as an uninterrupted run (augmentation and shuffling included), one clock, and Lightning's CSV and
    carnet's metrics.csv with the whole history."""
    common = [*TINY, f"data.root={tiny_data}", "trainer.num_sanity_val_steps=0", "data.verify=false", "logger=csv"]
    train(compose_cfg([*common, "trainer.max_epochs=3", f"run_dir={tmp_path / 'full'}"]))
    train(compose_cfg([*common, "trainer.max_epochs=2", f"run_dir={tmp_path / 'cut'}"]))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    train(compose_cfg([*common, "trainer.max_epochs=3", f"resume={last}", f"run_dir={tmp_path / 'resumed'}"]))

    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert list(resumed.epoch) == [1, 2, 3]
    columns = ["train/loss", "val/loss", "val/acc"]
    pd.testing.assert_frame_equal(resumed[columns], full[columns], rtol=1e-4)
    cut_seconds = read_metrics(tmp_path / "cut").elapsed_seconds.iloc[-1]
    assert resumed.elapsed_seconds.is_monotonic_increasing and resumed.elapsed_seconds.iloc[2] > cut_seconds
    assert read_summary(tmp_path / "resumed").seconds > cut_seconds
    lightning = [pd.read_csv(tmp_path / r / "csv" / "metrics.csv") for r in ("full", "resumed")]  # Lightning's: from 0
    assert sorted(lightning[1].epoch.dropna().unique()) == sorted(lightning[0].epoch.dropna().unique()) == [0, 1, 2]


def test_pretrained_weights_offline_fail_at_once_with_what_to_do(tiny_data: Path, tmp_path: Path) -> None:
    """The README's command with an unreachable hub and an empty cache: one line naming model.weights=, from the
    check that runs before the model is built (timm's download retried for about a minute, then a 100-line
    traceback). No wall-clock bound: on a loaded machine the interpreter's start alone varies by tens of seconds;
    that the line comes from carnet's check, not timm's retries, is what the message and the one line show."""
    env = {**child_env(), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"data.root={tiny_data}", "trainer=cpu",
                           "model=tf_efficientnet_lite0", "model.pretrained=true", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model.weights=PATH" in proc.stderr and "model.pretrained=false" in proc.stderr
    assert read_summary(tmp_path / "run").status == "failed"


def test_our_errors_raised_inside_hydra_instantiate_are_one_line(tiny_data: Path, tmp_path: Path) -> None:
    """A bad value caught by a class Hydra builds (`_target_`) reaches the user as our one line, not Hydra's
    'Error in call to target' block. (Single values are refused before anything is built, carnet/config_check.py;
    this pair of values is checked by the data module.)"""
    proc = _train_py(f"data.root={tiny_data}", *TINY, "data.cache=disk", "data.cache_dir=null",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("train: error: data.cache=disk needs data.cache_dir=PATH (a folder for the decoded "
                                   "images)")


def test_resume_from_a_weights_only_checkpoint_says_which_file_to_use(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"run_dir={run_dir}"]))
    best = run_dir / "checkpoints" / "best.ckpt"
    proc = _train_py(f"data.root={tiny_data}", *ONE_BATCH, f"resume={best}", f"hydra.run.dir={tmp_path / 'again'}")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds weights only" in proc.stderr and "checkpoints/last.ckpt" in proc.stderr
    train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", "trainer.max_epochs=2",
                       f"resume={run_dir / 'checkpoints' / 'last.ckpt'}", f"run_dir={tmp_path / 'resumed'}"]))
    assert read_summary(tmp_path / "resumed").epochs_run == 2
