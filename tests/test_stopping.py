"""Phases stop when they stop helping (issue 21 item 2): early stopping with its patience in optimizer steps, and
summary.json's planned beside taken steps."""

from __future__ import annotations

from pathlib import Path

from carnet.training.stopping import patience_in_validations
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


def test_patience_in_steps_is_the_same_training_on_small_and_large_data() -> None:
    assert patience_in_validations(30, 1) == 30  # 50 photos: one step an epoch
    assert patience_in_validations(30, 389) == 1  # 12,449 photos: less than an epoch, so the next validation
    assert patience_in_validations(10, 4) == 3  # rounded up: at least the steps asked for


def test_a_run_that_stops_improving_stops_early_and_says_so(tiny_data: Path, tmp_path: Path) -> None:
    """min_delta 10: no epoch after the first can improve val/loss that much, so a patience of one epoch's steps
    ends the run after epoch 2 of 5; summary.json has the steps it took beside those it planned."""
    summary = train(compose_cfg([*TINY, f"data.root={tiny_data}", "trainer.max_epochs=5", "data.verify=false",
                                 "trainer.num_sanity_val_steps=0", "early_stop.patience_steps=1",
                                 "early_stop.min_delta=10", f"run_dir={tmp_path / 'run'}"]))
    assert summary.status == "completed" and summary.stopped_early is True
    assert summary.epochs_run == 2 and summary.planned_steps == 5 * summary.steps_per_epoch
    assert summary.taken_steps == 2 * summary.steps_per_epoch


def test_without_early_stopping_a_run_takes_its_plan(tiny_data: Path, tmp_path: Path) -> None:
    summary = train(compose_cfg([*TINY, f"data.root={tiny_data}", "trainer.max_epochs=2", "data.verify=false",
                                 "trainer.num_sanity_val_steps=0", f"run_dir={tmp_path / 'run'}"]))
    assert summary.stopped_early is None and summary.taken_steps == summary.planned_steps
