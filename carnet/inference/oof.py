"""The out-of-fold rows of a k-fold sweep: every image with the fold whose run never trained on it.

Read from the runs' ``split.csv`` and ``summary.json`` alone (no checkpoint is loaded), for ``predict.py split=oof``
(:func:`carnet.inference.selection.oof_images`) and for tools that join predictions to folds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from carnet.artifacts import SPLIT_FILE
from carnet.errors import DataError
from carnet.summary import read_summary


def oof_frame(run_dirs: Sequence[str | os.PathLike], require_all: bool = False) -> pd.DataFrame:
    """Validation rows of k-fold runs: ``path, label, fold, run_dir`` (path relative to ``data_root``).

    Every row is an image that the run in ``run_dir`` never trained on, so predicting each row with its run's
    best checkpoint (``summary.json`` -> ``best_checkpoint``) and comparing with ``label`` gives the out-of-fold
    accuracy (``predict.py split=oof``). Checks that the runs share one fold assignment (same data, seed and
    num_folds) and that no fold appears twice; ``require_all`` also demands every fold.
    """
    if not run_dirs:
        raise DataError("oof_frame: no run directories given")
    parts, seen, reference, num_folds = [], {}, None, None
    for run_dir in map(Path, run_dirs):
        summary = read_summary(run_dir)
        fold = summary.fold
        if fold is None:
            raise DataError(f"{run_dir} was not trained on a fold (summary.json has no 'fold'): train with "
                            f"data.fold=K for out-of-fold predictions")
        if fold in seen:
            raise DataError(f"{run_dir} and {seen[fold]} both validate on fold {fold}: pass one run per fold")
        seen[fold] = run_dir
        if num_folds is None:
            num_folds = summary.num_folds
        elif summary.num_folds != num_folds:
            raise DataError(f"{run_dir} has num_folds={summary.num_folds}, other runs {num_folds}")
        split = pd.read_csv(run_dir / SPLIT_FILE)
        own = split[split.get("source", pd.Series("train", index=split.index)).eq("train")]
        assignment = own.set_index("path").fold.sort_index()
        if reference is None:
            reference = assignment
        elif not assignment.equals(reference):
            raise DataError(f"{run_dir}/{SPLIT_FILE} assigns images to folds differently from {seen[min(seen)]}: "
                            f"the runs differ in data, seed or num_folds")
        val = own[own.split == "val"]
        parts.append(pd.DataFrame({"path": val.path, "label": val.label, "fold": int(fold),
                                   "run_dir": str(run_dir), "data_root": summary.data_root}))
    if require_all and len(seen) != num_folds:
        missing = sorted(set(range(int(num_folds or 0))) - set(seen))
        raise DataError(f"out-of-fold predictions need every fold; missing fold(s) {missing}")
    return pd.concat(parts, ignore_index=True)
