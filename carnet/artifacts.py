"""The run directory's contract: file names, atomic writers and the reader of ``metrics.csv``.

Every later tool (phases, reports, sweeps, predict) reads these files, never a logger's internals, so they are
written by carnet whatever loggers a run uses (:class:`carnet.training.run_dir.RunArtifacts`). ``summary.json``,
the record of how the run went, has a module of its own: :mod:`carnet.summary`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

METRICS_FILE, CURVES_FILE, SPLIT_FILE = "metrics.csv", "curves.png", "split.csv"  # summary.json: carnet/summary.py
# metrics.csv, one row per epoch, epochs counted from 1 (carnet/summary.py): `epoch_seconds` is that epoch's time
# (training and validation, as the console prints it), `elapsed_seconds` the run's time at its end.
EPOCH_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "lr_backbone",
                 "epoch_seconds", "elapsed_seconds"]


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds, removed when
    it fails. A reader never sees half a file (or folder), and a failed write leaves the previous one as it was.

    The temporary file (``directory``: folder) exists, empty, when the block starts, in ``path``'s folder
    (created if missing), so the rename never crosses file systems. A folder can only replace a missing or
    empty folder (:func:`os.replace`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create 0600/0700 (private temporary files); the result is an ordinary output, so it gets
    # the modes open() and mkdir() would give it under the user's umask.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temporary file in the same folder + rename (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write JSON atomically: a reader never sees half a summary."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame as CSV (no index) atomically."""
    return write_text_atomic(path, frame.to_csv(index=False))


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell and column name that a spreadsheet would run as a formula prefixed with a
    single quote, as OWASP advises: a photo named ``=HYPERLINK(...).jpg`` stays text when predictions.csv is
    opened. Numbers are left alone. For files people open; never for files carnet reads back or Kaggle scores."""

    def safe(value: Any) -> Any:
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

    text = [column for column in frame.columns if not pd.api.types.is_numeric_dtype(frame[column])]
    frame = frame.copy(deep=False)
    for column in text:
        frame[column] = frame[column].map(safe)
    return frame.rename(columns=safe)


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's per-epoch metrics.csv (empty frame with the standard columns if no epoch finished).

    A file written before epochs were counted from 1 (its cumulative time is a ``seconds`` column) is read as one
    written now: its epochs moved up by one, its ``seconds`` as ``elapsed_seconds`` and their steps as
    ``epoch_seconds``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=EPOCH_COLUMNS)
    return upgrade_metrics(pd.read_csv(path))


def upgrade_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows of metrics.csv as they are written now, from rows written before epochs counted from 1 (or as given)."""
    if "seconds" not in metrics or "elapsed_seconds" in metrics:
        return metrics
    elapsed = metrics.pop("seconds")
    return metrics.assign(epoch=metrics["epoch"] + 1, epoch_seconds=elapsed.diff().fillna(elapsed).round(2),
                          elapsed_seconds=elapsed)
