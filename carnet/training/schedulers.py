"""Learning-rate schedules as Lightning ``lr_scheduler`` dicts, built per run from the `scheduler` config.

Each factory takes the optimizer (whose param groups already carry their own LRs: head, backbone) and the
run's length, and scales every group alike, so discriminative learning rates survive the schedule.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR, ReduceLROnPlateau

SchedulerConfig = dict[str, Any]


def _group_lrs(optimizer: Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def plateau(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, monitor: str = "val/acc",
            factor: float = 0.5, patience: int = 2, min_lr: float = 1e-7) -> SchedulerConfig:
    """ReduceLROnPlateau on a validation metric (accuracy: higher is better), checked every epoch."""
    mode = "min" if monitor.endswith("loss") else "max"
    scheduler = ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr)
    return {"scheduler": scheduler, "monitor": monitor, "interval": "epoch", "strict": True}


def cyclic(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, mode: str = "triangular2",
           base_lr_ratio: float = 0.1, epochs_per_half_cycle: float = 2.0, gamma: float = 1.0) -> SchedulerConfig:
    """CyclicLR between ``base_lr_ratio`` x and 1 x each group's LR, stepped every batch.

    Momentum cycling only for optimizers with a ``momentum`` (SGD); Adam-style optimizers have betas instead.
    """
    max_lrs = _group_lrs(optimizer)
    scheduler = CyclicLR(
        optimizer,
        base_lr=[lr * base_lr_ratio for lr in max_lrs],
        max_lr=max_lrs,
        step_size_up=max(1, round(epochs_per_half_cycle * steps_per_epoch)),
        mode=mode,
        gamma=gamma,
        cycle_momentum="momentum" in optimizer.defaults and optimizer.defaults["momentum"] > 0,
    )
    return {"scheduler": scheduler, "interval": "step"}


def cosine(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_fraction: float = 0.1,
           min_lr_ratio: float = 0.01) -> SchedulerConfig:
    """Linear warmup over ``warmup_fraction`` of the run's steps, then cosine decay to ``min_lr_ratio`` x LR,
    stepped every batch. A fraction, not epochs: a phase on 50 photos has one step an epoch."""
    warmup = min(round(warmup_fraction * total_steps), max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}


def onecycle(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, pct_start: float = 0.25,
             div_factor: float = 25.0, final_div_factor: float = 1e4) -> SchedulerConfig:
    """OneCycleLR over the whole run with each group's LR as its peak, stepped every batch."""
    total_steps = max(1, total_steps)
    if math.isclose(pct_start * total_steps, 1.0):
        # torch's warm-up would end at step 0, where it starts, and OneCycleLR divides by that length (4 steps at
        # pct_start 0.25: a tiny dataset's one-epoch run). A hair longer gives the same rates without the division.
        pct_start = (1.0 + 1e-6) / total_steps
    scheduler = OneCycleLR(optimizer, max_lr=_group_lrs(optimizer), total_steps=total_steps,
                           pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor,
                           cycle_momentum="momentum" in optimizer.defaults)
    return {"scheduler": scheduler, "interval": "step"}


def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> None:
    """No schedule: every group keeps its LR."""
    return None
