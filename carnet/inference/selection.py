"""Which images predict scores: the test images (``split=test``), a plain folder of photos (``images=DIR``), the
validation split shared by every checkpoint's run (``split=val``) or each fold of a k-fold sweep
(``split=oof``), with the training runs found from the checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from carnet.artifacts import SPLIT_FILE
from carnet.data.layout import IMAGE_EXTENSIONS, read_test
from carnet.errors import DataError, PredictError
from carnet.inference.ensemble import Model
from carnet.inference.oof import oof_frame
from carnet.summary import SUMMARY_FILE, read_summary


@dataclass
class Images:
    """The images to predict: paths relative to ``root``, ``ids`` to report them by, labels (-1 = unknown)."""

    root: Path
    paths: list[str]
    ids: list[str]
    labels: list[int] = field(default_factory=list)
    what: str = "test"


@dataclass
class FoldPart:
    """One fold of a k-fold sweep: the checkpoint of the run that validated on it, and that fold's images."""

    fold: int
    model: Model
    run_dir: Path
    images: Images


def test_images(root: str | os.PathLike) -> Images:
    """The test images in ``sample-submission.csv`` order (read_test checks the file and the images exist)."""
    frame = read_test(root)
    return Images(Path(root), list(frame.path), list(frame.Id), [-1] * len(frame), "test")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def folder_images(path: str | os.PathLike) -> Images:
    """``images=``: every image file in a folder and its sub-folders, or one image file; ids are the paths
    relative to the folder (``trip/a.jpg``), in sorted order.

    Sub-folders are searched (photos are often sorted into them); hidden files and folders (``.thumbnails``,
    macOS ``._IMG.JPG``) are not. An image file is one with a suffix in ``IMAGE_EXTENSIONS`` (any case); whether
    it decodes is checked when it is read, by the runner.
    """
    path = Path(path)
    if path.is_file():
        if not _is_image(path):
            raise DataError(f"images={path} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)}) "
                            f"or a folder of them")
        return Images(path.parent, [path.name], [path.name], [-1], "input")
    if not path.is_dir():
        raise DataError(f"images={path} does not exist; expected a folder of photos or one image file")
    files = []
    for folder, subfolders, names in os.walk(path):  # follows no symlinked folders: no loops
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # not even entered
        files += [(Path(folder) / n).relative_to(path).as_posix() for n in names
                  if not n.startswith(".") and _is_image(Path(n)) and (Path(folder) / n).is_file()]
    files.sort()
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path} or its sub-folders; "
                        f"expected images=DIR to hold the photos to classify")
    return Images(path, files, files, [-1] * len(files), "input")


def find_run_dir(model: Model, run_dir: str | os.PathLike | None = None, split: str = "val") -> Path:
    """The training run of a checkpoint: given, the parent of ``checkpoints/``, or the one its metadata names."""
    candidates = [Path(run_dir)] if run_dir else []
    if model.path.parent.name == "checkpoints":
        candidates.append(model.path.parent.parent)
    if model.meta.get("run_dir"):
        candidates.append(Path(model.meta["run_dir"]))
    for candidate in candidates:
        if (candidate / SPLIT_FILE).is_file():
            return candidate
    tried = ", ".join(str(c / SPLIT_FILE) for c in candidates) or "none (the checkpoint does not name its run)"
    raise PredictError(f"split={split}: cannot find the training run of checkpoint {model.path} (tried {tried}); "
                       f"pass run_dir=PATH, the run directory that holds {SPLIT_FILE}")


def _run_data_root(run_dir: Path, model: Model) -> Path | None:
    """The data root the run trained on (checkpoint metadata, else the run's summary.json)."""
    if model.meta.get("data_root"):
        return Path(model.meta["data_root"])
    summary = read_summary(run_dir, missing_ok=True)
    return Path(summary.data_root) if summary is not None and summary.data_root else None


def _per_model(run_dirs: Sequence[str | os.PathLike | None], count: int) -> list[str | os.PathLike | None]:
    """``run_dir=``: nothing, one path for every checkpoint, or one each."""
    run_dirs = list(run_dirs) or [None]
    if len(run_dirs) == 1:
        run_dirs = run_dirs * count
    if len(run_dirs) != count:
        raise PredictError(f"run_dir has {len(run_dirs)} entries for {count} checkpoints; expected one "
                           f"for all or one each")
    return run_dirs


def _split_images(root: Path, rows: pd.DataFrame, listed_in: Path, what: str) -> Images:
    """Labelled images of ``split.csv`` rows, after checking that they are all under ``root``."""
    missing = [p for p in rows.path if not (root / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} {what} image(s) of {listed_in} are not under data root {root}, first: "
                        f"{root / missing[0]}; pass data.root= the run's dataset")
    return Images(root, list(rows.path), list(rows.path), [int(x) for x in rows.label], what)


def val_images(models: Sequence[Model], root: str | os.PathLike | None,
               run_dirs: Sequence[str | os.PathLike | None]) -> Images:
    """Images in the validation split of every checkpoint's run (the intersection: no model trained on them)."""
    run_dirs = _per_model(run_dirs, len(models))
    frames = []
    for model, given in zip(models, run_dirs, strict=True):
        run = find_run_dir(model, given)
        split = pd.read_csv(run / SPLIT_FILE)
        if not {"path", "label", "split"} <= set(split.columns):
            raise PredictError(f"{run / SPLIT_FILE} has columns {list(split.columns)}; expected path,label,split")
        frames.append((run, split[split.split == "val"]))
    common = set(frames[0][1].path)
    for _, frame in frames[1:]:
        common &= set(frame.path)
    rows = frames[0][1][frames[0][1].path.isin(common)]
    if rows.empty:
        raise PredictError("split=val: the checkpoints' validation splits share no image "
                           f"({', '.join(str(r / SPLIT_FILE) for r, _ in frames)})")
    if root is None:
        root = _run_data_root(frames[0][0], models[0])
        if root is None:
            raise PredictError(f"split=val: the run {frames[0][0]} does not record its data root; pass data.root=")
    return _split_images(Path(root), rows, frames[0][0] / SPLIT_FILE, "validation")


def oof_images(models: Sequence[Model], root: str | os.PathLike | None,
               run_dirs: Sequence[str | os.PathLike | None]) -> tuple[list[FoldPart], int, int]:
    """(each checkpoint with its own fold's images in fold order, num_folds, images in the folds in all).

    :func:`carnet.inference.oof.oof_frame` checks that the runs share one fold assignment and that no fold is claimed
    twice; a checkpoint whose run did not train on a fold is an error naming it.
    """
    runs: list[Path] = []
    folds: list[int] = []
    for model, given in zip(models, _per_model(run_dirs, len(models)), strict=True):
        run = find_run_dir(model, given, "oof")
        summary = read_summary(run, missing_ok=True)
        columns = pd.read_csv(run / SPLIT_FILE, nrows=0).columns
        if summary is None or summary.fold is None or "fold" not in columns:
            why = (f"{run / SUMMARY_FILE} has no 'fold'" if "fold" in columns
                   else f"{run / SPLIT_FILE} has no 'fold' column")
            raise PredictError(f"split=oof: checkpoint {model.path} is not from a k-fold run ({why}); pass the "
                               f"best.ckpt of each run of `train.py -m data.num_folds=K data.fold=0,1,..`")
        runs.append(run)
        folds.append(int(summary.fold))
    try:
        frame = oof_frame(runs)
    except DataError as err:
        named = "; ".join(f"{m.path} -> run {r}" for m, r in zip(models, runs, strict=True))
        raise PredictError(f"split=oof: {err} (checkpoints: {named})") from err
    split = pd.read_csv(runs[0] / SPLIT_FILE)
    total = int(split.get("source", pd.Series("train", index=split.index)).eq("train").sum())
    num_folds = int(read_summary(runs[0]).num_folds)
    parts = []
    for model, run, fold in zip(models, runs, folds, strict=True):
        rows = frame[frame.fold == fold]
        data_root = Path(root) if root is not None else _run_data_root(run, model)
        if data_root is None:
            raise PredictError(f"split=oof: the run {run} does not record its data root; pass data.root=")
        parts.append(FoldPart(fold, model, run, _split_images(data_root, rows, run / SPLIT_FILE, "out-of-fold")))
    return sorted(parts, key=lambda p: p.fold), num_folds, total
