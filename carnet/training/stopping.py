"""Phases that stop when they stop helping: Lightning's ``EarlyStopping`` with its patience stated in optimizer
steps.

Why steps and not epochs: the same phase runs on 40 photos (one optimizer step an epoch at batch 32) and on 12,449
(389 steps an epoch). "Two epochs without improvement" is two steps on the first and 778 on the second; a patience
of ``early_stop.patience_steps`` steps means the same amount of training everywhere. Validation stays once an epoch
(metrics.csv has a row per epoch), so the patience is counted in validations: ``ceil(patience_steps / steps per
epoch)`` of them, at least one.

A phase (carnet.training.phases.Phase) validates its start before the first step; the patience counts from that
score, so a phase whose first ``patience_steps`` steps never beat its start stops there and hands its start on.
summary.json records ``taken_steps`` beside ``planned_steps`` (RunArtifacts) and ``stopped_early`` (here).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping

from carnet.summary import RunSummary
from carnet.training.phases import Phase

log = logging.getLogger(__name__)


def patience_in_validations(patience_steps: int, steps_per_epoch: int) -> int:
    """Validations (one an epoch) that span at least ``patience_steps`` optimizer steps; at least one."""
    return max(1, math.ceil(int(patience_steps) / max(1, int(steps_per_epoch))))


class PhaseEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on ``checkpoint.monitor`` with the patience in optimizer steps
    (:func:`patience_in_validations`), counted from the phase's start score when there is one."""

    def __init__(self, *, monitor: str, mode: str, patience_steps: int, steps_per_epoch: int,
                 min_delta: float) -> None:
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta,
                         patience=patience_in_validations(patience_steps, steps_per_epoch),
                         check_on_train_epoch_end=False)  # after each validation, which the score comes from
        self.patience_steps = int(patience_steps)
        self.stopped_at_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:  # resumed: the checkpoint holds the best score and the wait so far
            return
        phase = next((c for c in trainer.callbacks if isinstance(c, Phase)), None)
        start = phase.start.get(self.monitor) if phase is not None else None
        if start is not None:  # the Phase validated its start just before (it comes first in the callbacks)
            self.best_score = torch.tensor(float(start))

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        # Lightning's check, plus the step at which it stopped the run (for the log and summary.json).
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

    def add_to_summary(self, summary: RunSummary) -> None:
        """summary.json's ``stopped_early`` (:class:`carnet.summary.SummaryReporter`)."""
        summary.stopped_early = self.stopped_at_step is not None


def early_stopping(cfg: DictConfig, steps_per_epoch: int) -> list[pl.Callback]:
    """The run's early stopping when ``early_stop.patience_steps`` is set (never for a refit, which does not
    validate). After the phase's callback in the Trainer's list: the patience counts from the start it validates."""
    if cfg.early_stop.patience_steps is None or cfg.get("refit_from"):
        return []
    return [PhaseEarlyStopping(monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode,
                               patience_steps=int(cfg.early_stop.patience_steps), steps_per_epoch=steps_per_epoch,
                               min_delta=float(cfg.early_stop.min_delta))]
