"""How a run ends, and what its exit status and summary.json then say (docs/architecture.md, "How a run ends"):
interrupted by a signal (130, 143, a last.ckpt to continue from), refused (a folder it cannot write), refused
settings; and a pipeline that stops at an interrupted phase. Failures of a diverging run: test_nonfinite.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from carnet.errors import CarnetError
from carnet.models.checkpoint import read_checkpoint
from carnet.summary import read_summary
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env


def _train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for this process: its mode, and for root (whom modes do not bind) the immutable flag."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and (shutil.which("chattr") is None
                      or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0):
        folder.chmod(0o755)
        pytest.skip("running as root without chattr +i here: no folder is read-only to root")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("existing", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["new-run-dir", "existing-run-dir"])
def test_a_run_dir_in_a_read_only_folder_is_one_line(tmp_path: Path, existing: bool) -> None:
    folder = tmp_path / "read-only"
    run_dir = folder / "run"
    run_dir.mkdir(parents=True) if existing else folder.mkdir()
    with read_only(run_dir if existing else folder):
        proc = _train_py(f"data.root={tmp_path}", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"train: error: run directory {run_dir} is not writable")


def test_max_epochs_0_is_refused_in_one_line(tiny_data: Path, tmp_path: Path) -> None:
    """It used to end `completed`, with a best_checkpoint that was never written; then `failed`, after the run
    folder was locked and written. A value typed wrong now stops before anything is (carnet.config_check)."""
    run_dir = tmp_path / "run"
    for epochs in (0, -1):  # -1: Lightning's endless training
        with pytest.raises(CarnetError, match=rf"^trainer\.max_epochs={epochs}: expected a whole number >= 1 \(epochs"):
            train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"trainer.max_epochs={epochs}",
                               f"run_dir={run_dir}"]))
        assert not run_dir.exists()


def _signal_at(signum: signal.Signals, epoch: int | None) -> str:
    epoch_value = "null" if epoch is None else epoch
    return (f"+callbacks.signal={{_target_: tests.helpers.faults.SendSignal, signum: {int(signum)}, "
            f"epoch: {epoch_value}}}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_run_interrupted_with_a_resumable_last_ckpt(tiny_data: Path, tmp_path: Path,
                                                                      signum: signal.Signals) -> None:
    """SIGTERM (a scheduler's preemption) as Ctrl-C: status interrupted, exit 128 + the signal's number, one line
    saying how to continue, and a last.ckpt that continues the run. SIGTERM used to exit 0 as `failed`."""
    run_dir = tmp_path / "run"
    proc = _train_py(f"data.root={tiny_data}", *ONE_BATCH, "trainer.max_epochs=5", _signal_at(signum, 1),
                     f"hydra.run.dir={run_dir}")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train: interrupted by {signum.name}; continue the run with the same overrides plus resume={last} "
        "(the epoch that was cut short is trained again)")
    assert "Traceback" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())  # the file itself, not read_summary's reading
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted by {signum.name}"
    done = summary["epochs_run"]
    assert done >= 1 and read_checkpoint(last)["epoch"] == done - 1  # whole, and the last epoch that ended
    train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"trainer.max_epochs={done + 1}", f"resume={last}",
                       f"run_dir={tmp_path / 'resumed'}"]))
    resumed = read_summary(tmp_path / "resumed")
    assert resumed.status == "completed" and resumed.epochs_run == done + 1


def test_a_schedulers_preemption_handler_ends_the_run_interrupted(tiny_data: Path, tmp_path: Path) -> None:
    """submitit's SIGUSR2 handler requeues the job, then calls sys.exit: the run's summary said `failed:
    SystemExit` until the requeued job overwrote it. The handler here does what submitit's local executor's does,
    whose status the process must end with: the executor starts the requeued job only after an exit status of 144
    (carnet's own, 128 + SIGUSR2 = 140, left the job unrequeued: tests/test_resume.py's submitit test)."""
    run_dir = tmp_path / "run"
    script = ("import signal, sys\n"
              "signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(144))  # submitit's, after its requeue\n"
              "from carnet.training.cli import main\n"
              "main()\n")
    args = [f"data.root={tiny_data}", *ONE_BATCH, "trainer.max_epochs=5", _signal_at(signal.SIGUSR2, 1),
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 144, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by SIGUSR2"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_sigterm_before_training_starts_ends_interrupted(tiny_data: Path, tmp_path: Path) -> None:
    """Outside Lightning's fit (here while the trainer is built) SIGTERM used to kill the process outright,
    leaving summary.json `running`."""
    run_dir = tmp_path / "run"
    proc = _train_py(f"data.root={tiny_data}", *ONE_BATCH, _signal_at(signal.SIGTERM, None),
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "train: interrupted by SIGTERM before its first epoch ended (no last.ckpt yet): run it again")
    summary = json.loads((run_dir / "summary.json").read_text())  # the file itself, not read_summary's reading
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by SIGTERM"


@pytest.mark.slow
def test_a_pipeline_sent_sigterm_stops_its_phase_and_says_how_to_continue(tiny_data: Path, tmp_path: Path) -> None:
    """SIGTERM to the pipeline process (what Kubernetes signals) reaches the running phase, which ends interrupted
    with its last.ckpt; the pipeline exits 143 and names --dir and --phases from that phase on. It used to die at
    once, leaving the phase training on its own."""
    at_epoch_1 = _signal_at(signal.SIGTERM, 1).replace("+callbacks.signal={", "+callbacks.signal={to_parent: true, ")
    proc = subprocess.run([sys.executable, "-m", "carnet.training.pipeline", "--phases", "head,unfreeze_half",
                           f"data.root={tiny_data}", *ONE_BATCH, f"paths.output_dir={tmp_path}",
                           "head_fit.enabled=false", "head:trainer.max_epochs=5", f"head:{at_epoch_1}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    (folder,) = (tmp_path / "pipeline").iterdir()
    run_dir = folder / "1-head"
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pipeline stopped: phase head was interrupted by SIGTERM; its run directory is {run_dir}. Continue with: "
        f"carnet-pipeline --dir {folder} --phases head,unfreeze_half and the same overrides")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (folder / "2-unfreeze_half").exists()
