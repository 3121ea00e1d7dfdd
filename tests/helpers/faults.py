"""Faults injected into a real run through its `callbacks` config (`+callbacks.NAME._target_=...`), at an exact
moment instead of after a guessed sleep: a signal as a scheduler or a user sends it, a weight gone NaN."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch


class SendSignal(pl.Callback):
    """Sends a real signal to this process (or to its parent, ``to_parent``: the pipeline running this phase):
    when the trainer is built, before ``fit`` (``epoch=None``), or after the first batch of ``epoch``."""

    def __init__(self, signum: int, epoch: int | None = None, to_parent: bool = False) -> None:
        self.signum, self.epoch, self.to_parent = int(signum), epoch, to_parent
        if epoch is None:
            self._send()

    def _send(self) -> None:
        os.kill(os.getppid() if self.to_parent else os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self._send()


class PoisonWeights(pl.Callback):
    """Sets one head weight to NaN when validation of ``epoch`` (Lightning's, from 0) starts, as a diverging step
    would: that epoch's training losses were all finite."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            with torch.no_grad():
                next(pl_module.net.head.parameters()).view(-1)[0] = float("nan")
