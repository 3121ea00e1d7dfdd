"""The run directory's owner and writer: a lock while a run owns it, ``metrics.csv`` after every epoch,
``curves.png`` and ``summary.json``.

``summary.json`` exists from a run's first moment with ``status: running`` (and the pid and host that run it) and
ends as ``completed``, ``failed`` (with the reason) or ``interrupted``; a run killed outright stays ``running`` in
the file, and :func:`carnet.summary.read_summary` reports it as ``interrupted`` once its process is gone.
:class:`RunArtifacts` is the only writer of ``summary.json``.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from carnet.artifacts import (
    CURVES_FILE,
    EPOCH_COLUMNS,
    METRICS_FILE,
    upgrade_metrics,
    write_csv_atomic,
)
from carnet.errors import RunDirBusy, RunDirNotWritable, exit_on_error, stopping_signal
from carnet.plots import plot_curves
from carnet.summary import RunSummary, Status, SummaryReporter, now, write_summary

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs then rely on unique run directory names alone
    fcntl = None

LOCK_FILE = ".lock"


_HELD: set[Path] = set()  # run directories this process holds the lock of


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Own ``run_dir`` for the block: a second run into the same folder stops at once instead of mixing its files
    with ours. An advisory ``flock`` on ``.lock``, so the kernel releases it when the process dies, even by kill -9.

    The lock, not the file, says that a run lives: the file holds the owner's pid (for the refusal's message) and is
    removed when the block ends; one left by a killed run is taken over by the next run.

    Re-entrant within a process: :class:`RunDirGuard` takes it before Hydra writes into the folder, and
    :func:`carnet.training.train.train` takes it again for callers without Hydra.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if fcntl is None or key in _HELD:  # no advisory locks (Windows), or this process holds it already
        _check_writable(run_dir)
        yield
        return
    handle = _lock(run_dir)
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            # Removed before it is unlocked: a run that opened the file meanwhile finds it gone once it holds the lock,
            # and takes a new file (_lock), so two runs never hold locks on two different files.
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _not_writable(run_dir: Path, err: OSError) -> RunDirNotWritable:
    return RunDirNotWritable(f"run directory {run_dir} is not writable ({err.strerror}): give the run a writable "
                             "folder (hydra.run.dir=DIR, or run_dir=DIR when calling train())")


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):  # an existing folder: its .lock may still open, its new files would not
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as err:
        raise _not_writable(run_dir, err) from None


def _lock(run_dir: Path) -> IO[str]:
    """The open ``.lock`` of ``run_dir``, locked by this process; :class:`RunDirBusy` if another run holds it."""
    _check_writable(run_dir)
    path = run_dir / LOCK_FILE
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 (returned open, closed by the caller's `with`)
        except OSError as err:
            raise _not_writable(run_dir, err) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusy(f"run directory {run_dir} is in use by another run (pid {owner}): give this run its "
                             "own folder (hydra.run.dir=DIR, or run_dir=DIR when calling train())") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()  # the owner removed the file after we opened it: lock the one that is there now


class RunDirGuard(Callback):
    """Hydra callback (conf/hydra/default.yaml): owns the run directory before Hydra writes anything into it.

    Hydra's ``run_job`` creates the folder, opens the job's log file there and saves ``.hydra/`` before the task
    starts, so a run refused by the task's own lock would already have rewritten the owner's ``.hydra/``, and an
    unwritable folder would end in a logging traceback. ``on_run_start`` comes before all of that. Hydra turns a
    callback's exceptions into warnings, so a refusal exits here, as one line (``exit_on_error``). Sweeps get no
    ``on_run_start`` per job: their job folders are new by construction, and the task's lock still guards them.
    """

    def __init__(self) -> None:
        self._held = ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # DDP's other ranks rerun the script into rank 0's folder
            return
        with exit_on_error("train"):
            self._held.enter_context(run_dir_lock(config.hydra.run.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()


def _scalar(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


class RunArtifacts(pl.Callback):
    """Writes metrics.csv after every epoch, and curves.png + summary.json at the end of a run: the only writer of
    summary.json.

    ``summary`` starts with what the caller knows before training (model, image size, overrides, ...) and gets the
    data counts and the step budget from it before training (:meth:`RunSummary.update`); this callback adds the
    results, and every :class:`carnet.summary.SummaryReporter` callback of the trainer what it did.
    """

    STATE_VERSION = 2  # of state_dict: 2 counts epochs from 1 and times each epoch; 1 (none) counted from 0

    def __init__(self, run_dir: str | os.PathLike, summary: RunSummary, *, monitor: str, mode: str) -> None:
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode  # which epoch is "best": checkpoint.monitor and .mode, as best.ckpt
        self.summary = summary
        summary.update(pid=os.getpid(), host=socket.gethostname(), started_at=now(), monitor=monitor,
                       monitor_mode=mode)
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()  # moved back by a resume, so that `seconds` counts the whole run
        self.epoch_started = self.started
        self.trainer: pl.Trainer | None = None
        self.best_checkpoint: Path | None = None  # summary.json names it only once it exists

    def start(self) -> None:
        """Write ``status: running`` before anything can fail, so that every run directory has a summary."""
        self._write_summary("running")

    def finish(self, **fields: Any) -> None:
        """Mark a run that did not train (``tune=lr_find``) completed, with what it found."""
        self.summary.update(**fields)
        self._write_summary("completed")

    def fail(self, error: BaseException) -> None:
        """Record why the run stopped (``failed``, or ``interrupted`` by Ctrl-C or SIGTERM) unless that is recorded
        already: failures before training (bad data, bad weights) get a summary too, and report lists them."""
        if self.summary.status in ("failed", "interrupted"):
            return
        if (signum := stopping_signal(error)) is not None:
            self.summary.error = f"interrupted by {signum.name}"
            self._write_summary("interrupted")
            return
        self.summary.error = f"{type(error).__name__}: {error}".strip()
        self._write_summary("failed")

    def _write_summary(self, status: Status, pl_module: pl.LightningModule | None = None) -> None:
        self._collect(status, pl_module)
        write_summary(self.run_dir, self.summary)

    def _collect(self, status: Status, pl_module: pl.LightningModule | None = None) -> None:
        """Bring the summary up to now: status, clock, results, and what the reporting callbacks did."""
        summary = self.summary
        summary.update(status=status, seconds=round(time.time() - self.started, 2),
                       ended_at=None if status == "running" else now(), epochs_run=len(self.rows))
        metrics = pd.DataFrame(self.rows, columns=EPOCH_COLUMNS)
        if len(metrics) and metrics[self.monitor].notna().any():
            best = metrics[self.monitor].idxmin() if self.mode == "min" else metrics[self.monitor].idxmax()
            summary.update(best_val_acc=float(metrics["val/acc"][best]), best_epoch=int(metrics["epoch"][best]),
                           best_val_loss=float(metrics["val/loss"][best]))
        else:
            summary.update(best_val_acc=None, best_epoch=None, best_val_loss=None)
        if len(metrics) and metrics["val/acc"].notna().any():
            top = metrics["val/acc"].idxmax()
            summary.update(max_val_acc=float(metrics["val/acc"][top]), max_val_acc_epoch=int(metrics["epoch"][top]))
        if self.best_checkpoint is not None:
            summary.best_checkpoint = str(self.best_checkpoint) if self.best_checkpoint.is_file() else None
        if self.trainer is not None:
            summary.taken_steps = int(self.trainer.global_step)  # beside planned_steps: fewer when it stopped early
        for callback in self.trainer.callbacks if self.trainer is not None else []:
            if callback is not self and isinstance(callback, SummaryReporter):
                callback.add_to_summary(summary)  # last: a phase that kept its start weights reports that as best
        if pl_module is not None:
            summary.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            summary.total_params = sum(p.numel() for p in pl_module.parameters())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            self._write_summary("running", pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run keeps its earlier epochs and its clock: ``elapsed_seconds`` goes on from the checkpoint's.
        Rows of a checkpoint written before epochs counted from 1 are read as they are written now."""
        rows = list(state_dict.get("rows", []))
        if rows and state_dict.get("version", 1) < 2:
            rows = upgrade_metrics(pd.DataFrame(rows)).to_dict("records")
        self.rows = rows
        self.started = time.time() - float(state_dict.get("seconds", 0.0))
        if self.trainer is not None and self.trainer.is_global_zero and self.rows:
            self._write_metrics()  # the resumed run's folder has the whole history from its first moment

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "rows": self.rows, "seconds": time.time() - self.started}

    def _write_metrics(self) -> None:
        write_csv_atomic(pd.DataFrame(self.rows, columns=EPOCH_COLUMNS), self.run_dir / METRICS_FILE)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_started = time.time()  # a resume in mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_started = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        ended = time.time()
        self.rows.append({
            "epoch": trainer.current_epoch + 1,  # Lightning counts from 0; people, the console and carnet from 1
            "step": trainer.global_step,
            "train/loss": _scalar(metrics, "train/loss_epoch") if "train/loss_epoch" in metrics
            else _scalar(metrics, "train/loss"),
            "train/acc": _scalar(metrics, "train/acc"),
            "val/loss": _scalar(metrics, "val/loss"),
            "val/acc": _scalar(metrics, "val/acc"),
            "lr": groups[0]["lr"] if groups else math.nan,
            "lr_backbone": groups[1]["lr"] if len(groups) > 1 else math.nan,
            "epoch_seconds": round(ended - self.epoch_started, 2),
            "elapsed_seconds": round(ended - self.started, 2),
        })
        if trainer.is_global_zero:
            self._write_metrics()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._collect("completed", pl_module)
        if self.rows:
            title = f"{self.summary.model or ''} @ {self.summary.image_size or ''} px"
            plot_curves(pd.DataFrame(self.rows, columns=EPOCH_COLUMNS), self.run_dir / CURVES_FILE, title=title,
                        best_epoch=self.summary.best_epoch)
        write_summary(self.run_dir, self.summary)  # completed once every file is there

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.fail(exception)
