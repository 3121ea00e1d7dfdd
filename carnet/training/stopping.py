"""Phases that stop when they stop helping: Lightning's ``EarlyStopping`` with its patience stated in optimizer
steps, and the steps a run planned and took.

Why steps and not epochs: the same phase runs on 40 photos (one optimizer step an epoch at batch 32) and on 12,449
(389 steps an epoch). "Two epochs without improvement" is two steps on the first and 778 on the second; a patience
of ``early_stop.patience_steps`` steps means the same amount of training everywhere. Validation stays once an epoch
(metrics.csv has a row per epoch), so the patience is counted in validations: ``ceil(patience_steps / steps per
epoch)`` of them, at least one.

A phase (carnet.training.phases.Phase) validates its start before the first step; the patience counts from that
score, so a phase whose first ``patience_steps`` steps never beat its start stops there and hands its start on.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping

log = logging.getLogger(__name__)


def patience_in_validations(patience_steps: int, steps_per_epoch: int) -> int:
    """Validations (one an epoch) that span at least ``patience_steps`` optimizer steps; at least one."""
    return max(1, math.ceil(int(patience_steps) / max(1, int(steps_per_epoch))))


class StepsTaken(pl.Callback):
    """summary.json's ``taken_steps`` beside ``planned_steps``: the optimizer steps the run took (fewer when it
    stopped early). The steps up to the best epoch are ``(best_epoch + 1) * steps_per_epoch``."""

    def __init__(self) -> None:
        self.taken: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.taken = int(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.taken = int(trainer.global_step)

    def summary_fields(self) -> dict[str, Any]:
        return {} if self.taken is None else {"taken_steps": self.taken}


class PhaseEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on ``checkpoint.monitor`` with the patience in optimizer steps
    (:func:`patience_in_validations`), counted from the phase's start score when there is one."""

    def __init__(self, monitor: str, mode: str, patience_steps: int, steps_per_epoch: int,
                 min_delta: float = 0.0) -> None:
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta,
                         patience=patience_in_validations(patience_steps, steps_per_epoch),
                         check_on_train_epoch_end=False)  # after each validation, which the score comes from
        self.patience_steps = int(patience_steps)
        self.stopped_at_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the checkpoint holds the best score and the wait so far
            return
        start = next((c.start.get(self.monitor) for c in trainer.callbacks if hasattr(c, "start")
                      and isinstance(c.start, dict) and c.start.get(self.monitor) is not None), None)
        if start is not None:  # carnet.training.phases.Phase validated the start before this (it comes first)
            self.best_score = torch.tensor(float(start))

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        was_stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and not was_stopping and self.stopped_at_step is None:
            self.stopped_at_step = int(trainer.global_step)
            log.info("early stop after step %d: %s has not improved for %d validation(s) (patience %d steps)",
                     trainer.global_step, self.monitor, self.wait_count, self.patience_steps)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped_at_step": self.stopped_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stopped_at_step = state_dict.get("stopped_at_step")

    def summary_fields(self) -> dict[str, Any]:
        return {"stopped_early": self.stopped_at_step is not None, "patience_steps": self.patience_steps}


def stopping_callbacks(cfg: Any, steps_per_epoch: int) -> list[pl.Callback]:
    """The run's step record, and its early stopping when ``early_stop.patience_steps`` is set. After the phase's
    callback in the Trainer's list: the patience counts from the start score the phase validates first."""
    callbacks: list[pl.Callback] = [StepsTaken()]
    settings = cfg.get("early_stop") or {}
    if settings.get("patience_steps") is not None and not cfg.get("refit_from"):  # a refit does not validate
        callbacks.append(PhaseEarlyStopping(cfg.checkpoint.monitor, cfg.checkpoint.mode,
                                            int(settings.patience_steps), steps_per_epoch,
                                            float(settings.get("min_delta") or 0.0)))
    return callbacks
