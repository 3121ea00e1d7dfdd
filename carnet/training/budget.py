"""A run's length in optimizer steps: ``budget.min_steps`` sets ``trainer.max_epochs`` on small data.

Planned before the Trainer exists (its ``max_epochs`` comes from the plan), from the number of training photos and
the loader's own batch count, so the plan in ``summary.json`` is the number of steps the run takes.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, open_dict

from carnet.data.dataset import images_per_rank, train_batches


def steps_per_epoch(num_train: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch over ``num_train`` images: the training loader's batches
    (:func:`carnet.data.dataset.train_batches`), one step per ``accumulate`` of them, and one for a last shorter
    group, as Lightning steps on an epoch's last batch (its ``estimated_stepping_batches`` counts alike)."""
    return max(1, math.ceil(train_batches(num_train, batch_size) / max(1, accumulate)))


def budget_epochs(num_train: int, batch_size: int, max_epochs: int, min_steps: int = 0, accumulate: int = 1) -> int:
    """Epochs for a run: ``max_epochs``, or more on small data so that it takes at least ``min_steps`` optimizer
    steps. Epochs alone do not scale: 50 photos at batch 32 are one step an epoch, 12,449 photos are 389."""
    per_epoch = steps_per_epoch(num_train, batch_size, accumulate)
    return max(int(max_epochs), math.ceil(int(min_steps or 0) / per_epoch))


def plan_budget(cfg: DictConfig, num_train: int, batch_size: int, world_size: int = 1) -> dict[str, int]:
    """Set ``cfg.trainer.max_epochs`` from ``budget.min_steps`` (:func:`budget_epochs`); return the plan for
    summary.json. With DDP each of ``world_size`` processes steps through its share of the photos, in step with
    the others: the run's steps are one process's."""
    num_train = images_per_rank(num_train, world_size)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    epochs = budget_epochs(num_train, batch_size, cfg.trainer.max_epochs, cfg.budget.min_steps, accumulate)
    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
    per_epoch = steps_per_epoch(num_train, batch_size, accumulate)
    return {"max_epochs": epochs, "steps_per_epoch": per_epoch, "planned_steps": epochs * per_epoch}
