"""Stratified k-fold splits (``data.num_folds``, ``data.fold``) and the out-of-fold frame of a set of fold runs.

``python train.py -m data.fold=0,1,2,3,4`` trains one run per fold; fold k's validation set is fold k. The fold of
every image depends only on the labels, ``num_folds`` and ``seed``, so all runs of a sweep agree on it and
``split.csv`` (column ``fold``) records it. :func:`oof_frame` gathers the validation rows of such runs so that a
predictor can score each image with the one model that never trained on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from carnet.artifacts import SPLIT_FILE, read_summary
from carnet.data import DataError, stratified_split


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..num_folds-1) of every row: each class spread evenly over the folds, fixed by ``seed``.

    Hand-written (10 lines) rather than scikit-learn's StratifiedKFold to avoid a dependency: rows are shuffled
    within each class, the classes laid end to end and dealt round-robin, so every fold gets each class's
    count to within one and fold sizes differ by at most one.
    """
    if int(num_folds) < 2:
        raise DataError(f"data.num_folds={num_folds}: expected at least 2 folds")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
                           or [np.zeros(0, dtype=int)])
    folds = np.empty(len(labels), dtype=int)
    folds[order] = np.arange(len(order)) % int(num_folds)
    return folds


def assign_split(labels: Sequence[int], seed: int, val_fraction: float, num_folds: int | None = None,
                 fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(split "train"/"val", fold index or -1) per row: fold ``fold`` of ``num_folds`` is val when ``fold`` is set,
    else a stratified ``val_fraction`` (the foundation's split)."""
    if fold is None:
        is_val = stratified_split(labels, val_fraction, seed)
        return np.where(is_val, "val", "train"), np.full(len(is_val), -1)
    if num_folds is None or not 0 <= int(fold) < int(num_folds):
        raise DataError(f"data.fold={fold}: expected a fold index 0..{(num_folds or 0) - 1} "
                        f"(data.num_folds={num_folds})")
    folds = stratified_folds(labels, int(num_folds), seed)
    return np.where(folds == int(fold), "val", "train"), folds


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
        fold = summary.get("fold")
        if fold is None:
            raise DataError(f"{run_dir} was not trained on a fold (summary.json has no 'fold'): train with "
                            f"data.fold=K for out-of-fold predictions")
        if fold in seen:
            raise DataError(f"{run_dir} and {seen[fold]} both validate on fold {fold}: pass one run per fold")
        seen[fold] = run_dir
        if num_folds is None:
            num_folds = summary.get("num_folds")
        elif summary.get("num_folds") != num_folds:
            raise DataError(f"{run_dir} has num_folds={summary.get('num_folds')}, other runs {num_folds}")
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
                                   "run_dir": str(run_dir), "data_root": summary.get("data_root")}))
    if require_all and len(seen) != num_folds:
        missing = sorted(set(range(int(num_folds or 0))) - set(seen))
        raise DataError(f"out-of-fold predictions need every fold; missing fold(s) {missing}")
    return pd.concat(parts, ignore_index=True)
