"""How a run writes its checkpoints: ``best.ckpt`` (weights only, the best epoch by ``checkpoint.monitor``) and
``last.ckpt`` (everything ``resume=`` needs, every epoch), both written atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from carnet.artifacts import atomic_path


class WeightsCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the weights, carnet's metadata and hyper-parameters, without the optimizer state (for B6 and
    AdamW twice the weights again) that only a resume needs (``last.ckpt`` has it).

    Not Lightning's plain ``save_weights_only``: that skips the callbacks' ``on_save_checkpoint``, so with
    ``ema.decay`` the file would hold the raw weights instead of the average that validation chose. The whole
    checkpoint is built as usual (references, no copies), then the resume-only entries are left out.
    """

    RESUME_ONLY = ("optimizer_states", "lr_schedulers", "callbacks", "current_model_state", "averaging_state")

    def __init__(self, resume_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_weights_only=True, **kwargs)
        self.resume_from = Path(resume_from) if resume_from else None  # the last.ckpt a resumed run continues
        self.carried: Path | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed into a new folder keeps the best epoch so far: the stopped run's best.ckpt (beside the
        checkpoint it resumes from) comes along and stays the score to beat. Lightning keeps only its old path
        and would take the first resumed epoch as the best, so best.ckpt, summary.json's best epoch and a phase's
        hand-off would disagree."""
        previous = self.resume_from.parent if self.resume_from else None
        best = previous / Path(str(state_dict.get("best_model_path") or "")).name if previous else None
        here = Path(self.dirpath or "")
        if (best is not None and best.is_file() and state_dict.get("best_model_score") is not None
                and previous.resolve() != here.resolve()):
            self.carried = best
            mine = str(here / best.name)
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_path": mine, "kth_best_model_path": mine,
                          "best_k_models": {mine: state_dict["best_model_score"]}, "last_model_path": ""}
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.carried is not None and trainer.is_global_zero:
            with atomic_path(Path(self.best_model_path)) as tmp:
                shutil.copyfile(self.carried, tmp)
        self.carried = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for key in self.RESUME_ONLY:
            checkpoint.pop(key, None)
        trainer.strategy.save_checkpoint(checkpoint, filepath)
        trainer.strategy.barrier("WeightsCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def checkpoint_callbacks(folder: Path, monitor: str | None, mode: str, resume_from: str | None = None,
                         ) -> list[ModelCheckpoint]:
    """``best.ckpt`` (:class:`WeightsCheckpoint`) and ``last.ckpt`` in ``folder``; ``monitor`` None: best.ckpt is
    the last epoch (a refit, which validates nothing)."""
    best = WeightsCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode, auto_insert_metric_name=False,
                             enable_version_counter=False, resume_from=resume_from)
    # Not `save_last=True`: Lightning 2.6 rewrites last.ckpt only in epochs where the best improved, so it goes
    # stale and `resume=last.ckpt` would restart from an old epoch. An unmonitored callback writes it every epoch.
    last = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    return [best, last]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a temporary file beside the target, renamed over it when
    complete. A full disk or a kill mid-write leaves the previous ``last.ckpt`` / ``best.ckpt`` (or none), never a
    truncated file that fails to load at resume or in the next phase."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
