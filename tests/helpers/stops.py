"""Callbacks that stop a training run where a test needs it, given to a run as `+callbacks.NAME={_target_: ...}`.

They change nothing in the run itself (no randomness drawn, no state touched): the run they are in trains exactly
as without them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytorch_lightning as pl


class CopyCheckpoints(pl.Callback):
    """Copy the run's checkpoints folder to ``to`` once epoch ``epoch`` has ended, as a kill -9 at that moment would
    leave it (``last.ckpt``, ``best.ckpt``, a phase's ``start.ckpt``), and let the run go on: one run is then both
    the uninterrupted reference and the interrupted run."""

    def __init__(self, epoch: int, to: str) -> None:
        self.epoch, self.to = int(epoch), Path(to)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_train_epoch_end: ModelCheckpoint writes an epoch's files after every other callback's
        # on_train_epoch_end.
        if trainer.current_epoch == self.epoch + 1 and trainer.is_global_zero:
            shutil.copytree(trainer.checkpoint_callback.dirpath, self.to)


class WaitAfterEpoch(pl.Callback):
    """Once epoch ``epoch`` has ended in this process and its checkpoints are written, create the file ``ready`` and
    wait there (up to ``seconds``) for the test to signal or kill the process, so that the stop falls at a known
    place. A run that resumes after that epoch (with the same config, so with this callback too) does not wait."""

    def __init__(self, epoch: int, ready: str, seconds: float = 120.0) -> None:
        self.epoch, self.ready, self.seconds = int(epoch), Path(ready), float(seconds)
        self.ended: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ended = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ended == self.epoch:
            self.ready.touch()
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)
