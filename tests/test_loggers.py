"""The `logger` group: each logger writes its own files, with the run's hyperparameters, several at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from carnet.runtime import resolve_runtime
from carnet.training.builders import build_trainer
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


def test_logger_group_options_give_the_trainer_its_loggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by carnet.training.loggers.mlflow; undone after

    def loggers(*overrides: str) -> set[str]:
        cfg = compose_cfg([*TINY, *overrides])
        trainer = build_trainer(cfg, tmp_path, [], resolve_runtime(cfg))
        return {type(logger).__name__ for logger in trainer.loggers}

    assert loggers() == set()  # carnet's own metrics.csv and summary.json only, unless a logger is asked for
    assert loggers("logger=csv") == {"CSVLogger"}
    assert loggers("logger=[csv,tensorboard]") == {"CSVLogger", "TensorBoardLogger"}
    assert loggers("logger=all") == {"CSVLogger", "TensorBoardLogger", "MLFlowLogger"}
    assert loggers("logger=none") == set()


def test_every_logger_writes_its_files_with_hyperparameters(train_run: Callable,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, _ = train_run("logger=all", "optimizer=sgd", "optimizer.lr=0.0123")
    # CSV: Lightning's metrics.csv and the hparams, next to carnet's own metrics.csv
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["optimizer"]["lr"] == 0.0123 and hparams["model"]["name"] == "test_efficientnet"
    assert "val/acc" in (run_dir / "csv" / "metrics.csv").read_text()
    # TensorBoard: event files and the same hparams
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())["optimizer"]["lr"] == 0.0123
    # MLflow: a local file store inside the run directory, params and metrics in it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as carnet.training.loggers.mlflow does in the run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("carnet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["optimizer/lr"] == "0.0123" and run.data.params["head/_target_"].endswith("LinearHead")
    assert "val/acc" in run.data.metrics and run.info.run_name == run_dir.name
    assert (run_dir / "summary.json").is_file()  # carnet's own files whatever the loggers
