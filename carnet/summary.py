"""``summary.json``: what a run did, as one typed record.

Every later tool (the phase pipeline, ``carnet-report``, sweeps, ``predict.py split=val|oof``, ``resume=auto``)
learns about a run from its ``summary.json``; this module is its only definition. :class:`RunSummary` lists every
key (docs/architecture.md has the same table for people, and a test holds the two together),
:class:`carnet.training.run_dir.RunArtifacts` is the only writer, and :func:`read_summary` the only reader.

Epochs are counted from 1, as the console prints them: epoch N is the N-th pass over the training photos, and the
weights after it. Epoch 0 is the weights a run starts from (a phase that kept its start reports ``best_epoch: 0``).

The file carries ``version`` (``MAJOR.MINOR``). A reader fills what an older file lacks (files without a version
were written before it existed: 0-based epochs) and refuses a newer major version in one line; a newer minor
version only adds keys, which are kept in :attr:`RunSummary.extra`.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, overload, runtime_checkable

from carnet.artifacts import write_json
from carnet.errors import SummaryError

SUMMARY_FILE = "summary.json"
# 2.1: taken_steps, stopped_early, trained_on, refit_from, refit_steps; 2.0: epochs from 1, start and end times,
# max_val_acc; 1.0: the files without a version
SUMMARY_VERSION = "2.1"
Status = Literal["running", "completed", "failed", "interrupted"]  # docs/architecture.md "How a run ends"


@dataclass(slots=True)  # slots: a misspelt field is an AttributeError, not a silent new key
class RunSummary:
    """One run's ``summary.json``. Fields in the order the file lists them; docs/architecture.md says what each is."""

    version: str = SUMMARY_VERSION
    # How the run went (docs/architecture.md "How a run ends").
    status: Status = "running"
    error: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    seconds: float | None = None
    run_dir: str | None = None
    pid: int | None = None
    host: str | None = None
    job_id: str | None = None
    resumed_from: str | None = None
    # Results: best.ckpt's epoch, chosen by `monitor`, and its scores; the highest val/acc of any epoch.
    epochs_run: int = 0
    monitor: str | None = None
    monitor_mode: str | None = None
    best_epoch: int | None = None
    best_val_loss: float | None = None
    best_val_acc: float | None = None
    max_val_acc: float | None = None
    max_val_acc_epoch: int | None = None
    best_checkpoint: str | None = None
    # What ran.
    model: str | None = None
    head: str | None = None
    image_size: int | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    max_epochs: int | None = None
    steps_per_epoch: int | None = None
    planned_steps: int | None = None
    taken_steps: int | None = None
    stopped_early: bool | None = None
    resolved: dict[str, Any] | None = None
    # The data.
    data_root: str | None = None
    num_train: int | None = None
    num_val: int | None = None
    num_excluded: int | None = None
    num_dedup_excluded: int | None = None
    extra_sources: dict[str, Any] = field(default_factory=dict)
    fold: int | None = None
    num_folds: int | None = None
    corrections: dict[str, Any] | None = None
    # Fine-tuning (conf/phase): reported by the callbacks that do it (SummaryReporter).
    phase: str | None = None
    init_from: str | None = None
    phase_checkpoint: str | None = None
    start_val_loss: float | None = None
    start_val_acc: float | None = None
    kept_start: bool | None = None
    start_image_size: int | None = None
    start_val_loss_at_image_size: float | None = None
    start_val_acc_at_image_size: float | None = None
    unfrozen_fraction: float | None = None
    head_fit: dict[str, Any] | None = None
    # Which photos trained the weights the run ends with (`refit`, carnet.training.refit).
    trained_on: str | None = None
    refit_from: str | None = None
    refit_steps: int | None = None
    # tune=lr_find: what the learning-rate finder found (its curve is in lr_find.json).
    tune: dict[str, Any] | None = None
    # Keys of a newer minor version, kept as they were; never a key of the file itself.
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, **values: Any) -> None:
        """Set several fields at once; a name that is no field raises (AttributeError), as an assignment does."""
        for name, value in values.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """The file's content: every field (``None`` included, so that scripts find every key), then ``extra``."""
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, **{k: v for k, v in extra.items() if k not in data}}

    @classmethod
    def from_json(cls, data: Any, source: str | os.PathLike = SUMMARY_FILE) -> RunSummary:
        """The record of a file's content: an older version brought up to this one, a newer major version refused."""
        if not isinstance(data, dict):
            raise SummaryError(f"{source}: expected a JSON object (a carnet run summary), got {type(data).__name__}")
        version = str(data.get("version", "1.0"))
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise SummaryError(f"{source}: version {version!r} is not MAJOR.MINOR") from None
        current = int(SUMMARY_VERSION.split(".")[0])
        if major > current:
            raise SummaryError(f"{source} is summary version {version}, written by a newer carnet; this one reads "
                               f"versions up to {current}.x: upgrade carnet to read it")
        if major < 2:
            data = _from_version_1(data)
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**{**known, "version": SUMMARY_VERSION},
                   extra={k: v for k, v in data.items() if k not in names})


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A summary written before versions: its epochs counted from 0 (a kept start was -1)."""
    data = dict(data)
    if isinstance(data.get("best_epoch"), int):
        data["best_epoch"] = max(0, data["best_epoch"] + 1)
    return data


@runtime_checkable
class SummaryReporter(Protocol):
    """A callback that adds what it did to the run's summary (the phase, the unfrozen fraction, the fitted head).

    :class:`carnet.training.run_dir.RunArtifacts` calls :meth:`add_to_summary` on every such callback of the trainer
    each time it writes the summary, after its own fields, so a callback may also correct them (a phase that kept
    its start reports the start as the best). Fields are attributes: a misspelt one fails, it never adds a key."""

    def add_to_summary(self, summary: RunSummary) -> None:
        """Set this callback's fields of ``summary``."""


def now() -> str:
    """The time now, as summary.json records it: ISO 8601 in local time, with its UTC offset."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def write_summary(run_dir: str | os.PathLike, summary: RunSummary) -> Path:
    """Replace ``<run_dir>/summary.json`` atomically: a reader never sees half of it. Only RunArtifacts calls it."""
    return write_json(Path(run_dir) / SUMMARY_FILE, summary.to_json())


@overload
def read_summary(run_dir: str | os.PathLike, missing_ok: Literal[False] = False) -> RunSummary: ...


@overload
def read_summary(run_dir: str | os.PathLike, missing_ok: bool) -> RunSummary | None: ...


def read_summary(run_dir: str | os.PathLike, missing_ok: bool = False) -> RunSummary | None:
    """A run's summary (None with ``missing_ok`` when the folder has none; else FileNotFoundError).

    A run killed outright (kill -9, a lost machine) never writes its end, so its file still says ``running``: when
    the process it names is gone from this host, the run is reported as ``interrupted``.
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a carnet run directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SummaryError(f"{path} is not JSON ({err}): a damaged run summary") from None
    summary = RunSummary.from_json(data, path)
    if summary.status == "running" and not _process_alive(summary.pid, summary.host):
        summary.update(status="interrupted", error="the run's process ended without finishing (killed?)")
    return summary


def _process_alive(pid: Any, host: Any) -> bool:
    """Whether ``pid`` on ``host`` may still be running (True when this host cannot tell: another machine)."""
    if not isinstance(pid, int) or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
