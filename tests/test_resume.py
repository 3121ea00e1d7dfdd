"""A resumed run is the run it continues (carnet/training/resume.py, carnet/training/seeding.py): every schedule
in conf/scheduler and a phase run, resumed from the checkpoints a stop after epoch 2 leaves, end as the run that
never stopped; and a stopped run goes on in its own folder with resume=auto after kill -9, and by itself when
submitit requeues its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from carnet.artifacts import read_metrics
from carnet.errors import CarnetError
from carnet.summary import RunSummary, read_summary
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env, run_script

# Everything in summary.json that says what the run did (not where or how long).
RESULT_KEYS = ["status", "epochs_run", "best_epoch", "best_val_loss", "best_val_acc", "max_val_acc",
               "max_val_acc_epoch", "phase", "init_from", "start_val_loss", "start_val_acc", "kept_start",
               "unfrozen_fraction", "trainable_params"]
CLOCK = ["epoch_seconds", "elapsed_seconds"]  # metrics.csv's times: how long, not what the run did


def network(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = network(a), network(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("case", ["plateau", "cosine", "cyclic", "onecycle", "phase"])
def test_a_resumed_run_ends_as_the_run_that_never_stopped(case: str, tiny_data: Path, tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    """One run of 5 epochs, whose checkpoints folder is copied as a kill after epoch 2 leaves it; the copy's
    last.ckpt resumed into a new folder gives the same metrics.csv (lr included), summary, best.ckpt and, for a
    phase (unfreeze_half from init_from), the same start and hand-off. plateau cut the rate an epoch late: the
    checkpoint is written before Lightning's epoch-end plateau step, which a resumed run never took."""
    chosen = (["phase=unfreeze_half", f"init_from={tiny_checkpoint}"] if case == "phase"  # at its 64 px
              else [f"scheduler={case}", "image_size=32"])
    common = [*ONE_BATCH, f"data.root={tiny_data}", "trainer.max_epochs=5", "logger=none", *chosen]
    full, stopped, resumed = tmp_path / "full", tmp_path / "stopped", tmp_path / "resumed"
    copy = f"+callbacks.stop={{_target_:tests.helpers.stops.CopyCheckpoints,epoch:1,to:{stopped}}}"
    train(compose_cfg([*common, copy, f"run_dir={full}", f"paths.output_dir={full}"]))
    train(compose_cfg([*common, f"resume={stopped / 'last.ckpt'}", f"run_dir={resumed}",
                       f"paths.output_dir={resumed}"]))

    expected, got = read_metrics(full), read_metrics(resumed)
    assert expected["lr"].iloc[2:].nunique() > 1  # the schedule moves after the stop, so a wrong step would show
    pd.testing.assert_frame_equal(got.drop(columns=CLOCK), expected.drop(columns=CLOCK), rtol=1e-5)
    full_summary, summary = read_summary(full), read_summary(resumed)
    assert {key: getattr(summary, key) for key in RESULT_KEYS} == {key: getattr(full_summary, key)
                                                                   for key in RESULT_KEYS}
    assert_same_weights(full / "checkpoints" / "best.ckpt", resumed / "checkpoints" / "best.ckpt")
    if case == "phase":
        assert summary.init_from == str(tiny_checkpoint) and summary.start_val_loss is not None
        assert_same_weights(full / "phases" / "unfreeze_half.ckpt", resumed / "phases" / "unfreeze_half.ckpt")
        assert not (resumed / "checkpoints" / "start.ckpt").exists()  # brought along, then removed as it ends


# A stopped run continued in its own folder: by `resume=auto`, or by a cluster's requeue of its job.
IN_PLACE = [*ONE_BATCH, "image_size=32", "trainer.max_epochs=4", "logger=none"]


@pytest.fixture(scope="module")
def never_stopped(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """metrics.csv of the IN_PLACE run that nothing stopped."""
    run_dir = tmp_path_factory.mktemp("never_stopped")
    train(compose_cfg([*IN_PLACE, f"data.root={tiny_data}", f"run_dir={run_dir}"]))
    return read_metrics(run_dir)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before reaching its stop"
        assert time.monotonic() < deadline, f"{path} not created within {seconds} s"
        time.sleep(0.2)


def assert_continued(run_dir: Path, never_stopped: pd.DataFrame) -> RunSummary:
    """The run in ``run_dir`` ended as the run that never stopped, from its own last.ckpt; its summary."""
    summary = read_summary(run_dir)
    assert summary.status == "completed" and summary.epochs_run == 4
    assert summary.resumed_from == str(run_dir / "checkpoints" / "last.ckpt")
    metrics = read_metrics(run_dir)
    pd.testing.assert_frame_equal(metrics.drop(columns=CLOCK), never_stopped.drop(columns=CLOCK), rtol=1e-4)
    return summary


def test_resume_auto_continues_a_run_killed_after_epoch_2_in_its_folder(tiny_data: Path, tmp_path: Path,
                                                                       never_stopped: pd.DataFrame) -> None:
    """kill -9 after epoch 2, then the same command with resume=auto: the run goes on from its last.ckpt to the
    metrics of the run that never stopped. Another config is refused in one line, touching nothing; a completed
    run is left as it is."""
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    command = [f"data.root={tiny_data}", *IN_PLACE,
               f"+callbacks.stop={{_target_:tests.helpers.stops.WaitAfterEpoch,epoch:1,ready:{ready}}}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *command, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(ready, proc)
    finally:
        proc.kill()
        proc.wait()
    assert read_summary(run_dir).status == "interrupted" and len(read_metrics(run_dir)) == 2

    def files() -> dict[Path, int]:  # the run's files (the folder's .lock records each run that takes it)
        return {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.name != ".lock"}

    before = files()
    with pytest.raises(CarnetError, match=r"holds a stopped run of another config \(seed: 42 -> 7\)"):
        train(compose_cfg([*command, "seed=7", "resume=auto", f"run_dir={run_dir}"]))
    assert files() == before

    run_script("train.py", *command, "resume=auto", f"hydra.run.dir={run_dir}")
    summary = assert_continued(run_dir, never_stopped)
    assert train(compose_cfg([*command, "resume=auto", f"run_dir={run_dir}"])) == summary  # nothing left to train


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_continues_from_its_last_checkpoint(
        tiny_data: Path, tmp_path: Path, never_stopped: pd.DataFrame) -> None:
    """A run under hydra-submitit-launcher (submitit_local: a real submitit job) gets submitit's preemption signal
    (SIGUSR2) after epoch 2: submitit requeues the job with the same arguments, and the requeued run, in the same
    folder, continues from its last.ckpt without being asked to, to the metrics of the run that never stopped."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep, ready = tmp_path / "sweep", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
         "hydra.launcher.timeout_min=60",  # far from its time limit: submitit calls the signal a preemption
         f"data.root={tiny_data}", *IN_PLACE,
         f"+callbacks.stop={{_target_:tests.helpers.stops.WaitAfterEpoch,epoch:1,ready:{ready}}}"],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(ready, proc)
        os.kill(read_summary(sweep / "0").pid, signal.SIGUSR2)  # what submitit's SLURM signal option sends
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    log = "".join(path.read_text() for path in (sweep / ".submitit").rglob("*_log.*"))
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log and "Requeued job" in log
    assert f"Restoring states from the checkpoint path at {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in log
    assert assert_continued(sweep / "0", never_stopped).job_id.startswith("SUBMITIT_LOCAL_JOB_ID=")
