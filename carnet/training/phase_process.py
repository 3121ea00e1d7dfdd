"""How carnet-pipeline starts a phase's ``python -m carnet.training.cli ...``: forked from the pipeline's own
process, which imported carnet-train's training stack once, or as a fresh interpreter.

Why fork: importing torch, Lightning, timm and albumentations takes about 10 s on a 2-core CPU, paid again by
every phase and refit run in a fresh interpreter (seven times in a four-phase pipeline with its refit): a fifth of
a pipeline on 50 photos. A forked phase starts within a second and is still its own process: its own exit status
and signals (SIGTERM reaches it from the pipeline, Ctrl-C from the terminal), Hydra initialised afresh, nothing it
does seen by the pipeline or the phases after it. DataLoader workers are forked the same way.

A fork is only safe on Linux, from a process that has one thread and has not initialised CUDA (a forked child
cannot use CUDA its parent initialised); the pipeline asks CUDA nothing (a test holds it to that). Elsewhere, or
with ``pipeline.fork_phases=false``, the phase runs in a fresh interpreter, as typed.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Protocol

import torch
from hydra.core.global_hydra import GlobalHydra

from carnet.training import cli
from carnet.training import train as _training_stack  # noqa: F401  imported here once, before the forks


class PhaseProcess(Protocol):
    """What the pipeline needs of a running phase: subprocess.Popen's own names."""

    pid: int

    def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...


class ForkedPhase:
    """``python -m carnet.training.cli ARGS`` as a fork of this process; ``wait`` returns the exit status a fresh
    interpreter would (the code of its SystemExit, 1 after a traceback, -N when signal N killed it)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # multiprocessing's fork start: it flushes stdout/stderr before forking and ends the child with os._exit
        # (no atexit handler of the pipeline runs twice), with SystemExit's status or 1 after printing a traceback.
        self.process = multiprocessing.get_context("fork").Process(target=_run_train, args=(args, env),
                                                                   name=f"carnet-train {' '.join(args[:1])}")
        self.process.start()
        self.pid = self.process.pid

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def _run_train(args: list[str], env: dict[str, str]) -> None:
    """In the forked child: carnet-train's main with ``args``, as ``python -m carnet.training.cli`` runs it."""
    os.environ.update(env)
    sys.argv = [cli.__file__, *args]
    GlobalHydra.instance().clear()  # fresh Hydra state, whatever the parent composed
    cli.main()


def can_fork() -> bool:
    """Whether a phase may be forked from this process: Linux (macOS's system libraries are not fork-safe, which is
    why Python spawns there), one thread, CUDA not initialised."""
    return sys.platform.startswith("linux") and threading.active_count() == 1 and not torch.cuda.is_initialized()


def start_phase(command: list[str], env: dict[str, str], fork: bool = True) -> PhaseProcess:
    """Start a phase's command (:func:`carnet.training.cli.command`): forked when ``fork`` and :func:`can_fork`
    allow, else in a fresh interpreter."""
    if fork and command[:3] == cli.command() and can_fork():
        return ForkedPhase(command[3:], env)
    return subprocess.Popen(command, env=env)
