"""Every training epoch seeded from (seed, epoch, rank) alone, in every run: what makes ``resume=`` exact.

Why reseed instead of saving the random state in the checkpoint: the state at a checkpoint is not the state at the
next epoch's start (validation's loader draws a seed in between, in an order Lightning does not promise), while a
seed per epoch makes each epoch's shuffle, augmentation (albumentations' own generators, and loader workers, which
take their seeds from torch's when an epoch starts) and dropout masks independent of what ran before: a run
resumed from ``last.ckpt`` repeats the epochs an uninterrupted run would have had.

The seeding itself is the data layer's (:meth:`carnet.data.datamodule.CarDataModule.set_epoch`); this callback only
says when, because Lightning makes an epoch's loader iterator at two different moments: for the first epoch of a
fit (epoch 0, or the first resumed one) while it builds the loaders, before ``on_train_epoch_start`` (the
datamodule's ``train_dataloader`` seeds that epoch), for later epochs after it (this callback seeds them).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl


@runtime_checkable
class EpochSeeded(Protocol):
    """A datamodule that seeds each training epoch's draws (:meth:`CarDataModule.set_epoch`)."""

    seeded_epoch: int | None

    def set_epoch(self, epoch: int) -> None: ...


class SeedEachEpoch(pl.Callback):
    """Seeds each training epoch through the datamodule's ``set_epoch``, before the epoch draws its first batch.

    A fit without such a datamodule (plain loaders: a benchmark) is left as it is.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, EpochSeeded) or datamodule.seeded_epoch == trainer.current_epoch:
            return  # seeded before its iterator was made (the first epoch of a fresh run)
        datamodule.set_epoch(trainer.current_epoch)
        if trainer.fit_loop.is_resuming:
            # A resumed run: Lightning made this epoch's iterator while estimating the step count (before the
            # checkpoint restored the epoch number), under epoch 0's seed, and keeps it for the first resumed epoch.
            # Make it again, now seeded for this epoch. (A private attribute: Lightning has no hook between
            # restoring the epoch and making the iterator.)
            iter(trainer.fit_loop._data_fetcher)
