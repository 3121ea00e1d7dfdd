"""What ``split=test`` writes: the Kaggle submission (or, for ``images=DIR``, each photo's top-k classes) with
its probabilities, and optionally a pseudo-label source of the confident images (for ``data.extra``).

The ``check_*`` functions run before predict loads a checkpoint, so a bad ``out=`` or pseudo-label folder costs
nothing and no earlier output is replaced by a run that then fails.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from carnet.artifacts import atomic_path, spreadsheet_safe
from carnet.errors import PredictError
from carnet.inference.runner import console
from carnet.inference.selection import Images

SUBMISSION_COLUMNS = ["Id", "Category"]
PROBS_SUFFIX = ".probs.csv"


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(``out``, its probabilities file): ``submission.csv`` -> ``submission.probs.csv`` beside it.

    Named after ``out``, so two predictions written into one folder keep their own probabilities.
    """
    out = Path(out)
    return out, out.with_name(out.stem + PROBS_SUFFIX)


def _file_in_folder(path: Path, key: str, example: str) -> None:
    """``path`` can become a file: it is no folder and no parent of it is a file (checked, not created)."""
    if path.is_dir():
        raise PredictError(f"{key}={path} is a folder; expected a file name, e.g. {key}={path / example}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f"{key}={path}: {parent} is a file, not a folder; expected a path in a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PredictError(f"{key}={path}: cannot write in {parent} (permission denied)")
            return


def check_outputs(out: str | os.PathLike, example: str = "submission.csv") -> tuple[Path, Path]:
    """:func:`output_paths` after checking that both can be written (``out=`` a folder is the usual slip);
    ``example`` is the file name the message suggests."""
    text = os.fspath(out)
    if not text or text.endswith(("/", os.sep)):
        raise PredictError(f"out={text!r}: expected a file name, e.g. out={text}{example}")
    out, probs = output_paths(out)
    _file_in_folder(out, "out", example)
    if probs.is_dir():
        raise PredictError(f"out={out}: its probabilities file {probs} is a folder; choose another out=")
    for path in (out, probs):
        if _read_only(path):
            what = "" if path == out else f": its probabilities file {path}"
            raise PredictError(f"out={out}{what} is read-only; carnet does not replace it: choose another out=, or "
                               "make it writable first")
    return out, probs


def _read_only(path: Path) -> bool:
    """An existing file that its owner made read-only (no write bit), or that this user may not write.

    Checked by hand because the outputs are written to a temporary file and renamed over the old one, and a rename
    needs only the folder's permission: it would replace a 0444 file without a word (and root passes os.access).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    return not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK)


def check_report_dir(report_dir: str | os.PathLike) -> Path:
    """``report_dir`` (split=val|oof) is a folder or can become one."""
    report_dir = Path(report_dir)
    for path in (report_dir, *report_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise PredictError(f"report_dir={report_dir}: {path} is a file; expected a folder for the reports")
            break
    return report_dir


def _write_both(frames: Sequence[pd.DataFrame], paths: Sequence[Path]) -> None:
    """Write the CSVs to temporary files, then rename them together: a failed write replaces neither."""
    with contextlib.ExitStack() as stack:
        for frame, path in zip(frames, paths, strict=True):
            frame.to_csv(stack.enter_context(atomic_path(path)), index=False)


def _probs_table(id_column: str, ids: Sequence[str], probs: torch.Tensor, class_names: Sequence[str]) -> pd.DataFrame:
    table = pd.DataFrame(probs.numpy(), columns=list(class_names))
    table.insert(0, id_column, list(ids))
    return table


def write_submission(ids: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                     out: str | os.PathLike) -> tuple[Path, Path]:
    """``submission.csv`` (``Id,Category``, integer class) and ``submission.probs.csv`` (one column per class)."""
    out, probs_path = check_outputs(out)
    id_column, class_column = SUBMISSION_COLUMNS
    submission = pd.DataFrame({id_column: list(ids), class_column: probs.argmax(-1).numpy().astype(int)})
    # submission.csv's Ids stay exactly what Kaggle expects; the probabilities file is for people and spreadsheets
    _write_both([spreadsheet_safe(_probs_table(id_column, ids, probs, class_names)), submission], [probs_path, out])
    return out, probs_path


def top_k_table(files: Sequence[str], probs: torch.Tensor, class_names: Sequence[str], top_k: int) -> pd.DataFrame:
    """``file,class,probability`` (the top class) then ``class_2,probability_2`` .. up to ``top_k`` classes."""
    k = min(top_k, len(class_names))
    values, indices = probs.topk(k, dim=-1)  # sorted, best first
    table = pd.DataFrame({"file": list(files)})
    for rank in range(k):
        suffix = "" if rank == 0 else f"_{rank + 1}"
        table[f"class{suffix}"] = [class_names[i] for i in indices[:, rank].tolist()]
        table[f"probability{suffix}"] = values[:, rank].numpy()
    return table


def write_image_predictions(files: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                            out: str | os.PathLike, top_k: int) -> tuple[Path, Path]:
    """``images=DIR``: ``out`` (:func:`top_k_table`) and ``<out stem>.probs.csv`` (``file`` + one column per
    class); files are paths relative to the folder."""
    out, probs_path = check_outputs(out, "predictions.csv")
    tables = [_probs_table("file", files, probs, class_names), top_k_table(files, probs, class_names, top_k)]
    _write_both([spreadsheet_safe(table) for table in tables], [probs_path, out])
    return out, probs_path


def show_image_predictions(table: pd.DataFrame, limit: int = 20) -> None:
    """The top class of the first ``limit`` photos on the console."""
    view = Table(title=f"top class of {min(limit, len(table))} of {len(table)} photos")
    for column in ("file", "class", "probability"):
        view.add_column(column, justify="right" if column == "probability" else "left")
    for row in table.head(limit).itertuples(index=False):
        view.add_row(str(row.file), str(row[1]), f"{row[2]:.3f}")
    console.print(view)


def check_pseudo_labels(threshold: float, folder: str | os.PathLike) -> Path:
    """The pseudo-label settings are usable: a probability threshold and a folder that does not exist yet."""
    if not 0 < threshold <= 1:
        raise PredictError(f"pseudo_label.threshold={threshold}: expected a probability in (0, 1]")
    folder = Path(folder)
    if folder.exists():
        raise PredictError(f"pseudo-label folder {folder} already exists; choose another pseudo_label.name")
    return folder


def write_pseudo_labels(images: Images, probs: torch.Tensor, class_names: Sequence[str], threshold: float,
                        folder: str | os.PathLike, sources: Sequence[Path]) -> Path:
    """A pseudo-label source: ``pseudo.csv`` (``path,label``: absolute path, class index), ``source.yaml``.

    Rows are the images whose (ensemble) top probability is at least ``threshold``. ``counts.csv`` has the
    count per class. The folder is written under a temporary name and renamed, so a consumer never sees half.
    """
    folder = check_pseudo_labels(threshold, folder)
    top, label = probs.max(-1)
    keep = (top >= threshold).numpy()
    rows = pd.DataFrame({"path": [str((images.root / p).resolve()) for p in images.paths],
                         "label": label.numpy().astype(int)})[keep]
    counts = pd.DataFrame({"label": range(len(class_names)), "class_name": list(class_names),
                           "count": np.bincount(rows.label, minlength=len(class_names))})
    with atomic_path(folder, directory=True) as tmp:
        rows.to_csv(tmp / "pseudo.csv", index=False)
        counts.to_csv(tmp / "counts.csv", index=False)
        (tmp / "source.yaml").write_text(
            f"# carnet pseudo-labels: {len(rows)} of {len(keep)} {images.what} images with max probability "
            f">= {threshold}\n"
            f"# from: {', '.join(str(s) for s in sources)}\n"
            "name: pseudo\ntype: csv\npath: pseudo.csv\n")
    table = Table(title=f"pseudo-labels: {len(rows)}/{len(keep)} {images.what} images >= {threshold}")
    table.add_column("class")
    table.add_column("count", justify="right")
    for row in counts.itertuples():
        table.add_row(f"{row.label} {row.class_name}", str(row.count))
    console.print(table)
    console.print(f"pseudo-label source: {folder / 'source.yaml'}")
    return folder
