"""Refit: every photo trains the final model.

A run that validates holds a fifth of the photos out (``data.val_fraction``); they choose how long it trains and
which epoch it keeps, but never train the weights it hands on. On 50 photos that is 10 photos the model never sees.
Once validation has chosen, a refit run trains the same recipe again on train + validation photos, for the same
share of its plan, and keeps its last weights (there is nothing left to validate on).

``refit_from=<run dir>`` makes a run the refit of that (selection) run: it reads the selection's summary.json
(``best_epoch``, counted from 1, ``steps_per_epoch``, ``planned_steps``), puts every photo in training, plans its
own budget on them as any run does (``budget.min_steps``, ``trainer.max_epochs``), and stops after the same fraction
of that plan at which the selection run reached its best epoch, so the learning-rate schedule is the same curve
stopped at the same point. A selection phase that kept its start took no step worth repeating: its refit takes none
(for the head phase that is the head fit alone, now on every photo). ``carnet-pipeline`` runs the refits once all
phases have chosen (``refit``, carnet/training/pipeline.py); a plain ``train.py refit=true`` run refits itself
afterwards.

Why not refit phase by phase while the chain runs: the next phase would then validate on photos its start has
trained on, and every later choice would be biased towards keeping that start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from carnet.errors import RefitError
from carnet.summary import RunSummary, read_summary

log = logging.getLogger(__name__)

REFIT_DIR = "refit"  # a plain run's refit goes to <run dir>/refit


def refit_steps(selection: RunSummary, planned_steps: int) -> int:
    """Optimizer steps of the refit: the selection's steps to its best epoch (epochs count from 1; 0 is its start),
    as a share of its plan, times the refit's own plan (more photos, more steps an epoch); 0 when the selection
    kept its start."""
    best_epoch = selection.best_epoch
    if selection.kept_start or best_epoch is None or best_epoch < 1:
        return 0
    per_epoch = int(selection.steps_per_epoch or 1)
    planned = int(selection.planned_steps or per_epoch * best_epoch)
    share = min(1.0, best_epoch * per_epoch / max(1, planned))
    return max(1, round(share * planned_steps))


def read_selection(run_dir: str | os.PathLike) -> RunSummary:
    """The completed selection run's summary, or one line saying what is wrong."""
    summary = read_summary(run_dir, missing_ok=True)
    if summary is None:
        raise RefitError(f"refit_from={run_dir}: no summary.json there; point it to a completed run's directory")
    if summary.status != "completed":
        raise RefitError(f"refit_from={run_dir}: that run is {summary.status}, not completed; a refit repeats "
                         "the length a completed run chose")
    return summary


def check_refit(cfg: DictConfig) -> None:
    """Refused before anything trains, in one line: ``refit=true`` on a single phase run typed by hand (the chain
    is refitted by carnet-pipeline once every phase has chosen; a phase refitted alone would hand the next one
    weights that trained on its validation photos), a refit whose learning-rate schedule reads validation
    (``scheduler=plateau``), which a refit does not have, and a ``refit_from`` that is no completed run."""
    monitor = (cfg.get("scheduler") or {}).get("monitor")
    if (cfg.refit is True or cfg.get("refit_from")) and monitor:
        raise RefitError(f"refit with scheduler={cfg.scheduler.get('_target_', '').rsplit('.', 1)[-1]}: it lowers "
                         f"the learning rate when {monitor} stalls, and a refit trains on every photo with no "
                         "validation to read; use a schedule fixed in advance (scheduler=cosine, as the phases do, "
                         "or onecycle)")
    if cfg.get("refit_from"):
        read_selection(cfg.refit_from)
    if cfg.refit is True and cfg.get("phase") and not cfg.get("refit_from"):
        raise RefitError(f"refit=true on phase run {cfg.phase}: the phases are refitted on every photo by the "
                         "pipeline, once all of them have chosen their length: carnet-pipeline refit=true ... "
                         "(a phase refitted alone would hand the next phase weights that trained on its validation "
                         "photos)")


def train_on_all(datamodule: Any) -> int:
    """Move every validation photo into training (split.csv then lists them as train); return how many moved."""
    split = datamodule.split
    moved = int((split.split == "val").sum())
    split.loc[split.split == "val", "split"] = "train"
    return moved


def no_validation(cfg: DictConfig) -> None:
    """A refit has no validation photos: no validation loop, no sanity check."""
    with open_dict(cfg):
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0


class Refit(pl.Callback):
    """What makes a run the refit of ``refit_from``: its selection's share of the plan, all photos, no validation.

    It stops training after :func:`refit_steps` optimizer steps, leaving ``trainer.max_epochs`` (and so the
    learning-rate schedule, planned over the whole budget) as planned: Lightning's ``max_steps`` would shorten the
    schedule too."""

    def __init__(self, selection_dir: str | os.PathLike) -> None:
        self.selection_dir = Path(selection_dir)
        self.selection = read_selection(selection_dir)
        self.steps: int | None = None
        self.moved = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Refit | None:
        """The refit of ``cfg.refit_from``; None for any other run (:func:`check_refit` ran before the run began)."""
        return cls(cfg.refit_from) if cfg.get("refit_from") else None

    def prepare(self, cfg: DictConfig, datamodule: Any) -> None:
        """After the split is drawn: every photo trains, validation is off."""
        self.moved = train_on_all(datamodule)
        no_validation(cfg)

    def plan(self, planned_steps: int) -> None:
        """Its steps, from its own plan (:func:`carnet.training.budget.plan_budget`, on every photo)."""
        self.steps = refit_steps(self.selection, planned_steps)
        log.info("refit of %s on every photo (%d validation photos added): %d of %d planned steps, the share at "
                 "which the selection run reached its best epoch (%s)", self.selection_dir, self.moved, self.steps,
                 planned_steps, self.selection.best_epoch)

    def _stop_once_taken(self, trainer: pl.Trainer) -> None:
        if self.steps is not None and trainer.global_step >= self.steps:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_once_taken(trainer)  # a refit of 0 steps takes none

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_once_taken(trainer)

    def add_to_summary(self, summary: RunSummary) -> None:
        """summary.json's ``trained_on``, ``refit_from``, ``refit_steps`` (:class:`carnet.summary.SummaryReporter`)."""
        summary.update(trained_on="train+val", refit_from=str(self.selection_dir), refit_steps=self.steps)


def refit_config(cfg: DictConfig, run_dir: str | os.PathLike) -> DictConfig:
    """The config of a plain run's refit: the same, into ``<run dir>/refit``, following ``run_dir``'s choice."""
    refit = cfg.copy()
    with open_dict(refit):
        refit.refit_from = str(run_dir)
        refit.run_dir = str(Path(run_dir) / REFIT_DIR)
        refit.resume = None
    return refit


def wants_plain_refit(cfg: DictConfig) -> bool:
    """A plain run (no phase, not itself a refit) with ``refit=true`` refits itself once it has chosen."""
    return cfg.refit is True and not cfg.get("phase") and not cfg.get("refit_from") and not cfg.get("tune")
