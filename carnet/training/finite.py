"""A run whose loss or weights stop being finite (NaN, infinity: a learning rate too high) stops as ``failed``,
and nothing non-finite is written to a checkpoint.

Not Lightning's own switches: ``Trainer(detect_anomaly=True)`` runs autograd's anomaly mode on every step (slow),
and ``EarlyStopping(check_finite=True)`` looks at the monitored validation metric only, after that epoch's
checkpoints are written (Lightning's ModelCheckpoint treats a NaN monitor as merely the worst score).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from carnet.errors import NonFiniteError
from carnet.models.checkpoint import nonfinite_tensors


class StopOnNonFinite(pl.Callback):
    """Fails the run at the first non-finite training loss, validation loss or weight, before it reaches a file.

    Each step folds ``isfinite(loss)`` into a flag on the device (no host sync: on a GPU, reading a value every
    step would stall the queue). The flag is read at Lightning's logging cadence, where the logged loss is read
    anyway, and before every checkpoint is written, together with the weights about to be saved.
    """

    def __init__(self, lr: float | None = None) -> None:
        self.lr = lr  # optimizer.lr, for the advice
        self._first_bad: torch.Tensor | None = None  # the optimizer step of the first non-finite loss; -1: none

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_bad = torch.tensor(-1, device=pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or self._first_bad is None:
            return
        seen = torch.isfinite(loss.detach()).all() | (self._first_bad >= 0)
        self._first_bad = torch.where(seen, self._first_bad, trainer.global_step)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check_loss(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._check_loss(trainer)
        where = f"after epoch {trainer.current_epoch + 1} (step {trainer.global_step})"  # epochs from 1, as printed
        if bad := nonfinite_tensors(checkpoint["state_dict"]):
            raise NonFiniteError(f"training diverged: {len(bad)} weight tensor(s) hold NaN or infinity {where} "
                                 f"(first: {bad[0]}), so no checkpoint was written; {self._advice()}")
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None and not bool(torch.isfinite(val_loss)):
            raise NonFiniteError(f"training diverged: the validation loss is {float(val_loss)} {where}; "
                                 f"{self._advice()}")

    def _check_loss(self, trainer: pl.Trainer) -> None:
        if self._first_bad is None:
            return
        step = int(trainer.strategy.reduce(self._first_bad, reduce_op="max"))  # any rank's: all ranks stop together
        if step >= 0:
            raise NonFiniteError(f"training diverged: the training loss is NaN or infinite in epoch "
                                 f"{trainer.current_epoch + 1}, step {step}; {self._advice()}")

    def _advice(self) -> str:
        if self.lr is None:
            return "lower the learning rate (optimizer.lr)"
        return f"lower the learning rate (optimizer.lr={self.lr:g} now; try optimizer.lr={self.lr / 10:g})"
