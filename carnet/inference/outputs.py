"""What ``split=test`` writes: the Kaggle submission with its probabilities, and optionally a pseudo-label
source of the confident test images (for ``data.extra``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from carnet.artifacts import atomic_path, write_csv_atomic
from carnet.inference.ensemble import PredictError
from carnet.inference.runner import console
from carnet.inference.selection import Images

SUBMISSION_COLUMNS = ["Id", "Category"]


def write_submission(ids: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                     out: str | os.PathLike) -> tuple[Path, Path]:
    """``submission.csv`` (``Id,Category``, integer class) and ``probs.csv`` (one column per class) next to it."""
    out = Path(out)
    table = pd.DataFrame(probs.numpy(), columns=list(class_names))
    table.insert(0, "Id", list(ids))
    probs_path = write_csv_atomic(table, out.with_name("probs.csv"))
    id_column, class_column = SUBMISSION_COLUMNS
    submission = pd.DataFrame({id_column: list(ids), class_column: probs.argmax(-1).numpy().astype(int)})
    return write_csv_atomic(submission, out), probs_path


def write_pseudo_labels(images: Images, probs: torch.Tensor, class_names: Sequence[str], threshold: float,
                        folder: str | os.PathLike, sources: Sequence[Path]) -> Path:
    """A pseudo-label source: ``pseudo.csv`` (``path,label``: absolute path, class index), ``source.yaml``.

    Rows are the images whose (ensemble) top probability is at least ``threshold``. ``counts.csv`` has the
    count per class. The folder is written under a temporary name and renamed, so a consumer never sees half.
    """
    if not 0 < threshold <= 1:
        raise PredictError(f"pseudo_label.threshold={threshold}: expected a probability in (0, 1]")
    folder = Path(folder)
    if folder.exists():
        raise PredictError(f"pseudo-label folder {folder} already exists; choose another pseudo_label.name")
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
            f"# carnet pseudo-labels: {len(rows)} of {len(keep)} test images with max probability >= {threshold}\n"
            f"# from: {', '.join(str(s) for s in sources)}\n"
            "name: pseudo\ntype: csv\npath: pseudo.csv\n")
    table = Table(title=f"pseudo-labels: {len(rows)}/{len(keep)} test images >= {threshold}")
    table.add_column("class")
    table.add_column("count", justify="right")
    for row in counts.itertuples():
        table.add_row(f"{row.label} {row.class_name}", str(row.count))
    console.print(table)
    console.print(f"pseudo-label source: {folder / 'source.yaml'}")
    return folder
