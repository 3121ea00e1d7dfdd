"""summary.json as one typed record (carnet.summary): one writer, one reader, a version, callbacks that report
through a declared protocol, and the documentation's table of its keys. Fast: no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
from torch import nn

from carnet.artifacts import EPOCH_COLUMNS, read_metrics, write_json
from carnet.errors import SummaryError
from carnet.summary import SUMMARY_FILE, SUMMARY_VERSION, RunSummary, SummaryReporter, read_summary
from carnet.tools.report import find_runs
from carnet.training.finetune import ProgressiveUnfreezing
from carnet.training.head_fit import HeadFit
from carnet.training.phases import Phase
from carnet.training.resume import continue_in_place
from carnet.training.run_dir import RunArtifacts
from tests.helpers.config import compose_cfg
from tests.helpers.paths import REPO

KEYS = [name for name in RunSummary.__dataclass_fields__ if name != "extra"]


def row(epoch: int, val_loss: float, val_acc: float, elapsed: float) -> dict[str, float]:
    return {"epoch": epoch, "step": epoch, "train/loss": 1.0, "train/acc": 0.5, "val/loss": val_loss,
            "val/acc": val_acc, "lr": 1e-3, "lr_backbone": 1e-4, "epoch_seconds": 2.0, "elapsed_seconds": elapsed}


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)


class Reports(pl.Callback):
    """A callback that reports through the protocol, as Phase and ProgressiveUnfreezing do."""

    def add_to_summary(self, summary: RunSummary) -> None:
        summary.update(phase="probe", unfrozen_fraction=0.25)


def written(tmp_path: Path, rows: list[dict], *callbacks: object, monitor: str = "val/loss",
            mode: str = "min", version: int = 2) -> RunSummary:
    """The summary RunArtifacts writes at the end of a run with ``rows`` behind it, restored from a checkpoint as
    Lightning does (setup, then the checkpoint's state)."""
    artifacts = RunArtifacts(tmp_path, RunSummary(model="m"), monitor=monitor, mode=mode)
    trainer = pl.Trainer(callbacks=[*callbacks, artifacts], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = Tiny()
    artifacts.setup(trainer, module, "fit")
    artifacts.load_state_dict({"rows": rows, "seconds": 10.0, **({"version": version} if version > 1 else {})})
    artifacts.on_fit_end(trainer, module)
    return read_summary(tmp_path)


def test_best_is_best_ckpts_epoch_and_the_highest_accuracy_is_its_own_key(tmp_path: Path) -> None:
    """best_* is the epoch checkpoint.monitor chose (val/loss: epoch 2), not the highest val/acc (epoch 3), which
    max_val_acc reports; epochs count from 1; start and end times."""
    summary = written(tmp_path, [row(1, 0.9, 0.5, 3.0), row(2, 0.4, 0.7, 5.0), row(3, 0.6, 0.8, 7.0)])
    assert (summary.best_epoch, summary.best_val_loss, summary.best_val_acc) == (2, 0.4, 0.7)
    assert (summary.max_val_acc, summary.max_val_acc_epoch) == (0.8, 3)
    assert (summary.monitor, summary.monitor_mode, summary.epochs_run, summary.status) == ("val/loss", "min", 3,
                                                                                          "completed")
    assert summary.started_at <= summary.ended_at and summary.seconds >= 10.0 and summary.total_params == 8
    assert summary.unfrozen_fraction is None and summary.phase is None  # a plain run: no schedule, no phase


def test_callbacks_report_through_the_protocol(tmp_path: Path) -> None:
    assert written(tmp_path, [], Reports()).phase == "probe"
    assert read_summary(tmp_path).unfrozen_fraction == 0.25
    schedule = ProgressiveUnfreezing([[0, 0.0], [2, 1.0]], bn="frozen")
    reporters = [schedule, HeadFit(views=1, folds=2, max_images=None, pseudo_label=None,
                           seed=0),
                 Phase(None, None, tmp_path, "test_efficientnet", {}, 10, monitor="val/loss", mode="min")]
    assert all(isinstance(callback, SummaryReporter) for callback in reporters)
    assert written(tmp_path, [], schedule).unfrozen_fraction == 0.0  # where the schedule stands before epoch 1


def test_a_misspelt_field_fails_instead_of_adding_a_key() -> None:
    summary = RunSummary()
    with pytest.raises(AttributeError):
        summary.update(bset_epoch=3)
    with pytest.raises(AttributeError):
        summary.unfrozen_fractoin = 1.0  # type: ignore[attr-defined]


def test_the_file_has_every_key_and_reads_back_as_it_was(tmp_path: Path) -> None:
    summary = RunSummary(status="completed", best_epoch=3, overrides=["a=1"], extra_sources={"web": {"used": 2}},
                         resolved={"precision": "32"})
    write_json(tmp_path / SUMMARY_FILE, summary.to_json())
    data = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert list(data) == KEYS and data["version"] == SUMMARY_VERSION
    assert read_summary(tmp_path) == summary


def test_a_summary_from_before_versions_reads_with_epochs_from_1(tmp_path: Path) -> None:
    """Files written before the version key counted epochs from 0 and a kept start as -1; metrics.csv then had a
    cumulative `seconds`. Both read as they are written now; a key the reader does not know is kept."""
    runs = {"trained": {"best_epoch": 4, "best_val_acc": 0.9}, "kept": {"best_epoch": -1, "kept_start": True},
            "none": {"best_epoch": None}}
    for name, fields in runs.items():
        write_json(tmp_path / name / SUMMARY_FILE, {"status": "completed", "unknown_key": 1, **fields})
    assert [read_summary(tmp_path / name).best_epoch for name in runs] == [5, 0, None]
    old = read_summary(tmp_path / "trained")
    assert old.version == SUMMARY_VERSION and old.extra == {"unknown_key": 1} and old.started_at is None

    pd.DataFrame({"epoch": [0, 1], "val/acc": [0.5, 0.6], "seconds": [3.0, 5.5]}).to_csv(
        tmp_path / "trained" / "metrics.csv", index=False)
    metrics = read_metrics(tmp_path / "trained")
    assert list(metrics.epoch) == [1, 2] and list(metrics.elapsed_seconds) == [3.0, 5.5]
    assert list(metrics.epoch_seconds) == [3.0, 2.5] and "seconds" not in metrics


def test_a_checkpoint_from_before_versions_resumes_with_epochs_from_1(tmp_path: Path) -> None:
    """last.ckpt of a run started before epochs counted from 1 holds 0-based rows with `seconds`."""
    old_rows = [{k: v for k, v in row(e, 0.5, 0.5, 0).items() if not k.endswith("_seconds")} | {"epoch": e - 1,
                                                                                                  "seconds": 2.0 * e}
                for e in (1, 2)]
    assert written(tmp_path, old_rows, version=1).best_epoch == 1
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns) == EPOCH_COLUMNS and list(metrics.epoch) == [1, 2]


def test_a_newer_major_version_is_refused_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_json(run / SUMMARY_FILE, {**RunSummary(status="completed").to_json(), "version": "3.1"})
    with pytest.raises(SummaryError) as raised:
        read_summary(run)
    message = str(raised.value)
    assert "\n" not in message and "version 3.1" in message and "upgrade carnet" in message and str(run) in message
    # resume=auto in that folder stops on it, as a CarnetError (one line from train.py), before anything is built
    with pytest.raises(SummaryError, match=r"version 3\.1"):
        continue_in_place(compose_cfg(["resume=auto"]), run)
    # carnet-report lists it as unreadable, with the reason, and still compares the other runs
    (run_of_report,) = find_runs(tmp_path)
    assert run_of_report.status == "unreadable" and "version 3.1" in run_of_report.summary.error


def test_a_newer_minor_version_keeps_its_new_keys(tmp_path: Path) -> None:
    major = SUMMARY_VERSION.split(".")[0]
    write_json(tmp_path / SUMMARY_FILE, {**RunSummary().to_json(), "version": f"{major}.9", "new_key": [1]})
    assert read_summary(tmp_path).extra == {"new_key": [1]}


def test_a_damaged_summary_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / SUMMARY_FILE).write_text('{"status": "compl')
    with pytest.raises(SummaryError, match=re.escape(str(tmp_path / SUMMARY_FILE)) + " is not JSON"):
        read_summary(tmp_path)


def test_the_documentation_lists_every_key_in_order() -> None:
    """docs/architecture.md's table "Every key of summary.json" is the record's field list (docs/runs.md, where the
    README sends a user for the run directory, links to it)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("### Every key of summary.json", 1)[1].split("\n\n#", 1)[0]
    documented = [key for line in table.splitlines() if line.startswith("| `")
                  for key in re.findall(r"`([a-z_]+)`", line.split("|")[1])]
    assert documented == KEYS
    assert "architecture.md#every-key-of-summaryjson" in (REPO / "docs" / "runs.md").read_text()


def test_one_writer_and_one_reader() -> None:
    """Every tool goes through read_summary (which reports a killed run as interrupted and reads old versions):
    nothing else opens the file or parses it; and only RunArtifacts (carnet/training/run_dir.py) writes it."""
    raw = re.compile(r"(json\.loads|json\.load|open|read_text)\([^\n]*(SUMMARY_FILE|summary\.json)")
    sources = [*(REPO / "carnet").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    texts = {path.relative_to(REPO).as_posix(): path.read_text() for path in sources}
    readers = [f"{path}:{number}" for path, text in texts.items() if path != "carnet/summary.py"
               for number, line in enumerate(text.splitlines(), 1) if raw.search(line)]
    assert not readers
    writers = sorted(path for path, text in texts.items() if "write_summary(" in text)
    assert writers == ["carnet/summary.py", "carnet/training/run_dir.py"]
