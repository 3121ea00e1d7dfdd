"""Train/validation membership: a stratified split by ``seed`` (``data.val_fraction``) or k stratified folds.

Each photo's side (and fold) comes from a hash of its path and the seed alone, not from a shuffle of the whole
file list: adding photos, or removing others, never moves a photo between train and validation or between
folds. So phases, later runs on grown data and out-of-fold predictions never validate on a photo that an
earlier run trained on. The hash is uniform, so each class's validation share is ``val_fraction`` up to sampling
noise (about ±1 point for 1,500 photos a class). The one exception keeps every class learnable and validated:
when the hashes put all photos of a class on one side (only likely for a handful of photos), the photo nearest
the boundary crosses over (a class of one photo trains), and it may cross back once the class grows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from carnet.errors import DataError


def photo_hashes(paths: Sequence[str], seed: int) -> np.ndarray:
    """A number in [0, 1) per path, uniform over paths and fixed by (path, seed) alone, on every machine.

    BLAKE2b rather than Python's ``hash`` (salted per process) or a seeded RNG (its draw depends on the order and
    number of rows).
    """
    digests = [hashlib.blake2b(f"{int(seed)}\n{p}".encode(), digest_size=8).digest() for p in paths]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.float64) / 2.0**64 if digests else np.zeros(0)


def _check_unique(paths: Sequence[str]) -> None:
    """A path twice could land once in train and once in val (the both-sides rule below splits equal hashes)."""
    repeated = sorted(p for p, n in Counter(paths).items() if n > 1)
    if repeated:
        raise DataError(f"{len(repeated)} image path(s) listed twice for the split, first: {repeated[0]} "
                        f"(expected each photo once)")


def stratified_split(paths: Sequence[str], labels: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: a photo validates when its hash is below ``val_fraction``.

    Then, per class, when every photo is on one side the one nearest the threshold crosses over, so every class of
    two or more photos is in both splits and a class of one photo trains.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}: expected a fraction in (0, 1)")
    _check_unique(paths)
    labels = np.asarray(labels)
    u = photo_hashes(paths, seed)
    is_val = u < val_fraction
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        if is_val[rows].all():
            is_val[rows[np.argmax(u[rows])]] = False
        elif not is_val[rows].any() and len(rows) > 1:
            is_val[rows[np.argmin(u[rows])]] = True
    return is_val


def stratified_folds(paths: Sequence[str], labels: Sequence[int], num_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..num_folds-1) of every row: the hash's k-th of [0, 1), so a photo keeps its fold as data grows.

    Folds hold each class in equal shares up to sampling noise. A class of two or more photos that all hash into
    one fold gets the photo nearest that fold's upper edge moved to the next fold, so that every fold's training
    sees the class.
    """
    if int(num_folds) < 2:
        raise DataError(f"data.num_folds={num_folds}: expected at least 2 folds")
    num_folds = int(num_folds)
    _check_unique(paths)
    labels = np.asarray(labels)
    scaled = photo_hashes(paths, seed) * num_folds
    folds = np.minimum(scaled.astype(int), num_folds - 1)
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        if len(rows) > 1 and len(set(folds[rows])) == 1:
            top = rows[np.argmax(scaled[rows] - folds[rows])]
            folds[top] = (folds[top] + 1) % num_folds
    return folds


def assign_split(paths: Sequence[str], labels: Sequence[int], seed: int, val_fraction: float,
                 num_folds: int | None = None, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(split "train"/"val", fold index or -1) per row: fold ``fold`` of ``num_folds`` is val when ``fold`` is set,
    else a stratified ``val_fraction`` (the foundation's split). ``paths`` are the photos' paths relative to the
    data root, as split.csv records them: they, with the seed, decide membership."""
    paths = [str(p) for p in paths]
    if fold is None:
        is_val = stratified_split(paths, labels, val_fraction, seed)
        return np.where(is_val, "val", "train"), np.full(len(is_val), -1)
    if num_folds is None or not 0 <= int(fold) < int(num_folds):
        raise DataError(f"data.fold={fold}: expected a fold index 0..{(num_folds or 0) - 1} "
                        f"(data.num_folds={num_folds})")
    folds = stratified_folds(paths, labels, int(num_folds), seed)
    if len(folds) and not (folds == int(fold)).any():
        raise DataError(f"data.fold={fold}: no image falls in fold {fold} of data.num_folds={num_folds} "
                        f"({len(folds)} images); use fewer folds")
    return np.where(folds == int(fold), "val", "train"), folds
