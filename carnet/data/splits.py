"""Train/validation membership: a stratified split by ``seed`` (``data.val_fraction``) or k stratified folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from carnet.data.layout import DataError


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: ``val_fraction`` of each class, chosen by ``seed`` alone.

    The same labels and seed give the same mask in every run and phase, so phases never validate on images
    an earlier phase trained on.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}: expected a fraction in (0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        n_val = round(len(rows) * val_fraction)
        if len(rows) > 1:
            n_val = min(max(n_val, 1), len(rows) - 1)  # every class in both splits when it can be
        is_val[rng.permutation(rows)[:n_val]] = True
    return is_val


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
