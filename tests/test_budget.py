"""Phase budgets in optimizer steps (carnet.training.budget): tiny data gets more epochs, Kaggle-sized data keeps its
epochs, and the plan counts the steps a run takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from carnet.training.budget import budget_epochs, plan_budget, steps_per_epoch
from tests.helpers.config import compose_cfg
from tests.helpers.recipe import data_module


@pytest.mark.parametrize(("num_train", "batch", "accumulate", "expected"),
                         [(40, 32, 1, 1), (20, 32, 1, 1), (292, 32, 1, 9), (12_449, 32, 1, 389), (12_449, 32, 2, 195)])
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


class _StepCounter(pl.LightningModule):
    """The smallest module that takes optimizer steps: Lightning's ``global_step`` counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.weight * batch[0].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(("batch_size", "accumulate"), [(7, 1), (8, 3), (5, 4), (64, 1)])
def test_the_plan_counts_the_optimizer_steps_a_run_takes(tiny_data: Path, batch_size: int, accumulate: int) -> None:
    """One epoch of the datamodule's own training loader under Lightning's gradient accumulation takes the steps
    the plan says: the loader's drop_last rule and Lightning's step on a last, shorter accumulation group."""
    datamodule = data_module(tiny_data, [str(k) for k in range(10)], image_size=32, batch_size=batch_size,
                             num_workers=0, verify=False)
    datamodule.setup("fit")
    num_train = int((datamodule.split.split == "train").sum())
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=accumulate, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(_StepCounter(), train_dataloaders=datamodule.train_dataloader())
    assert trainer.global_step == steps_per_epoch(num_train, batch_size, accumulate)


def test_under_ddp_the_loader_and_the_plan_count_one_processs_share(tiny_data: Path) -> None:
    """Two processes share an epoch's photos (DistributedSampler: half each, padded). The loader's drop rule counted
    all of them: 57 photos at batch 32 made 29 a process and no batch at all, and the run "completed" with no
    step; the plan counted one process's steps as if it trained on every photo (4 x too many on 4 GPUs)."""
    datamodule = data_module(tiny_data, [str(k) for k in range(10)], image_size=32, batch_size=20, num_workers=0,
                             verify=False)
    datamodule.setup("fit")
    num_train = int((datamodule.split.split == "train").sum())
    assert num_train // 2 < 20 < num_train  # one batch and a dropped rest in one process; less than a batch in two
    assert datamodule.train_dataloader().drop_last
    datamodule.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False)
    assert not datamodule.train_dataloader().drop_last  # each process's share is its one, shorter batch
    cfg = compose_cfg(["trainer.max_epochs=1", "budget.min_steps=0"])
    assert plan_budget(cfg, num_train, 20, world_size=2)["steps_per_epoch"] == 1
    assert plan_budget(cfg, 12_449, 32, world_size=4)["steps_per_epoch"] == steps_per_epoch(3_113, 32) == 97
