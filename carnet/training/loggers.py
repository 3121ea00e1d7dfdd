"""Experiment loggers of the ``logger`` config group, and the run's hyperparameters logged once to each.

carnet's own ``metrics.csv``/``summary.json`` (carnet/artifacts.py) are written whatever the loggers; these
are for people who browse runs in TensorBoard or MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger


def mlflow(save_dir: str | os.PathLike, experiment_name: str = "carnet", run_name: str | None = None,
           tracking_uri: str | None = None, **kwargs: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger; by default with a local file store in ``<run dir>/mlruns``.

    Written by hand because MLFlowLogger puts a file store straight into ``save_dir`` (numbered experiment
    folders among the run's own files); browse with ``mlflow ui --backend-store-uri <run dir>/mlruns``.
    MLflow 3 keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set:
    carnet opts in (a self-contained run directory needs no database or server); give ``tracking_uri``
    (``http://...``, ``sqlite:///...``) to log elsewhere.
    """
    if tracking_uri is None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking_uri = (Path(save_dir).resolve() / "mlruns").as_uri()
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name or Path(save_dir).name,
                        tracking_uri=tracking_uri, **kwargs)


class LogConfig(pl.Callback):
    """Logs the whole resolved run config (not only the module's arguments) once to every logger, on rank 0.

    The module is built with ``save_hyperparameters(logger=False)`` so that Lightning does not log its own,
    smaller set as well: MLflow refuses a parameter logged twice with another value.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.params = OmegaConf.to_container(cfg, resolve=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.params)
            logger.save()
