"""``ema.decay``: an exponential moving average of the weights (Lightning's ``EMAWeightAveraging``), whose
average starts from the weights training starts from."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging


class WeightEMA(EMAWeightAveraging):
    """Lightning's EMA, its average re-based on the weights training starts from.

    Lightning copies the module into the average at ``setup``, before ``on_fit_start``, where the head fit
    (:class:`carnet.training.head_fit.HeadFit`) writes the head; the first update overwrites that copy, but a run
    that takes no step (the refit of a phase that kept its start) ended with it swapped in: the head before it was
    fitted (on the 365-photo dev set, a refitted head phase scored 0.179 where its weights score 1.000). So the
    average takes the current weights at ``on_train_start``, unless it has averaged already (a resumed run's)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        if average is not None and int(average.n_averaged) == 0:
            average.module.load_state_dict(pl_module.state_dict())
