"""Phase budgets in optimizer steps: tiny data gets more epochs, Kaggle-sized data keeps its epochs."""

from __future__ import annotations

import pytest

from carnet.training.builders import budget_epochs, plan_budget, steps_per_epoch
from tests.helpers.config import compose_cfg


@pytest.mark.parametrize(("num_train", "batch", "accumulate", "expected"),
                         [(40, 32, 1, 1), (20, 32, 1, 1), (292, 32, 1, 9), (12_449, 32, 1, 389), (12_449, 32, 2, 194)])
def test_steps_per_epoch_drops_the_last_partial_batch(num_train: int, batch: int, accumulate: int,
                                                       expected: int) -> None:
    assert steps_per_epoch(num_train, batch, accumulate) == expected


def test_small_data_gets_epochs_until_the_step_floor_large_data_keeps_its_epochs() -> None:
    assert budget_epochs(40, 32, max_epochs=5, min_steps=200) == 200  # 50 photos, 80% train: 1 step an epoch
    assert budget_epochs(292, 32, max_epochs=5, min_steps=200) == 23  # 9 steps an epoch: ceil(200 / 9)
    assert budget_epochs(12_449, 32, max_epochs=5, min_steps=200) == 5  # 389 steps an epoch: the floor is met
    assert budget_epochs(40, 32, max_epochs=5, min_steps=0) == 5


def test_plan_budget_sets_the_trainer_epochs_and_reports_the_plan() -> None:
    cfg = compose_cfg(["trainer.max_epochs=3", "budget.min_steps=50"])
    plan = plan_budget(cfg, num_train=100, batch_size=32)
    assert cfg.trainer.max_epochs == plan["max_epochs"] == 17  # 3 steps an epoch
    assert plan == {"max_epochs": 17, "steps_per_epoch": 3, "planned_steps": 51}
