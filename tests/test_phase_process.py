"""carnet-pipeline's phases as forks of its own process (carnet.training.phase_process): they end as a fresh
interpreter's would, a process with other threads runs them fresh, and the pipeline's own process never touches
CUDA, which is what makes forking them safe on a GPU."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console

from carnet.summary import read_summary
from carnet.training.phase_process import ForkedPhase, can_fork, start_phase
from carnet.training.pipeline import run_pipeline
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.runs import child_env


@pytest.mark.slow  # ~30 s on 2 cores; the fast suite's pipelines fork their phases too. Keeps `make test` under 10 min
def test_a_forked_phase_ends_as_a_fresh_interpreter_would(tiny_data: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Same exit status and the same one-line error, forked or fresh; with a second thread alive it runs fresh."""
    def ending(fork: bool) -> tuple[type, int, str]:
        command = [sys.executable, "-m", "carnet.training.cli", f"data.root={tiny_data}", *TINY,
                   "early_stop.min_delta=-1", f"hydra.run.dir={tmp_path / str(fork)}"]
        process = start_phase(command, child_env(), fork=fork)
        code = process.wait()
        return type(process), code, capfd.readouterr().err.strip().splitlines()[-1]

    forks = can_fork()  # False when an earlier test left a thread running in this process
    forked, fresh = ending(fork=True), ending(fork=False)
    assert forked[0] is (ForkedPhase if forks else subprocess.Popen) and fresh[0] is subprocess.Popen
    assert forked[1:] == fresh[1:] and forked[1] != 0 and "early_stop.min_delta" in forked[2]
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert ending(fork=True) == fresh  # forking a process with threads could copy a lock one of them holds
    finally:
        release.set()
        other.join()


@pytest.mark.slow  # ~18 s on 2 cores: a two-phase pipeline; keeps `make test` under 10 minutes
def test_the_pipelines_own_process_asks_cuda_nothing(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked child cannot use CUDA that its parent initialised, and asking for the device count initialises the
    driver: the pipeline may fork its phases on a GPU only because it never asks. (The phases ask, in their own
    processes: what they record stays there.)"""
    asked: list[str] = []
    count_devices, lazy_init = torch._C._cuda_getDeviceCount, torch.cuda._lazy_init
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", lambda: asked.append("device count") or count_devices())
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: asked.append("init") or lazy_init())
    torch.cuda.is_available()
    assert asked == ["device count"]  # the spy sees what torch.cuda asks
    asked.clear()
    folder = run_pipeline([f"data.root={tiny_data}", *ONE_BATCH, f"paths.output_dir={tmp_path}",
                           "head_fit.enabled=false"], ["head", "unfreeze_half"], console=Console(file=io.StringIO()))
    assert [read_summary(folder / run).status for run in ("1-head", "2-unfreeze_half")] == ["completed"] * 2
    assert asked == []
