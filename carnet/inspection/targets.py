"""What ``carnet-inspect`` looks at, resolved before anything is computed or written: a run (its validation photos),
a k-fold sweep (every photo out of fold), a checkpoint with a data root, or a data root alone (a probe only).

Each becomes a :class:`Target`: the labelled photos with their side of the split, the checkpoints and the photos each
one scores without having trained on them, and the model whose ImageNet backbone the label-error probe uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from carnet.artifacts import SPLIT_FILE
from carnet.config import config_dir
from carnet.config_check import TimmModel
from carnet.data.layout import scan_train
from carnet.data.splits import assign_split
from carnet.errors import CarnetError, InspectError, PredictError
from carnet.inference.ensemble import Model, load_models
from carnet.inference.runner import Runner, predict_probs
from carnet.inference.selection import Images, find_run_dir, oof_images, val_images
from carnet.inference.tta import TTA
from carnet.models.checkpoint import read_checkpoint
from carnet.summary import SUMMARY_FILE, read_summary
from carnet.tools.report import find_runs


@dataclass
class Scored:
    """Out-of-sample class probabilities: each photo scored by a model that never trained on it."""

    scope: str  # "validation", "out-of-fold" or "probe out-of-fold"
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    folds: list[int] = field(default_factory=list)


@dataclass
class Target:
    """The photos, models and split of one inspection."""

    kind: str  # run | sweep | checkpoint | data
    name: str  # what the page calls it
    root: Path
    class_names: list[str]
    frame: pd.DataFrame  # path, label, split, fold, source: every labelled photo and its side
    split_note: str
    model_name: str
    image_size: int
    weights: str | None = None  # ImageNet weights file the run started from (model.weights)
    pretrained: bool = True
    models: list[Model] = field(default_factory=list)
    parts: list[tuple[Model, Images, int]] = field(default_factory=list)  # (checkpoint, photos it scores, fold)
    default_out: Path = Path("outputs/inspect")

    @property
    def is_sweep(self) -> bool:
        return self.kind == "sweep"

    def predict(self, runner: Runner, tta: TTA) -> Scored | None:
        """Each part's photos scored by its checkpoint (a sweep: each fold by its own run); None without models."""
        if not self.parts:
            return None
        paths, labels, probs, folds = [], [], [], []
        for model, images, fold in self.parts:
            probs.append(predict_probs([model], images, tta, runner).numpy())
            paths += images.paths
            labels += images.labels
            folds += [fold] * len(images.paths)
        scope = "out-of-fold" if self.is_sweep else "validation"
        return Scored(scope, paths, np.asarray(labels), np.concatenate(probs), folds)


def _hparams(path: Path) -> dict[str, Any]:
    """The training hyper-parameters a checkpoint keeps (model.weights, model.pretrained), plain values only."""
    return dict(read_checkpoint(path).get("hyper_parameters") or {})


def _split_frame(run_dir: Path) -> pd.DataFrame:
    split = pd.read_csv(run_dir / SPLIT_FILE)
    if not {"path", "label", "split"} <= set(split.columns):
        raise InspectError(f"{run_dir / SPLIT_FILE} has columns {list(split.columns)}; expected path,label,split")
    if "fold" not in split:
        split["fold"] = -1
    if "source" not in split:
        split["source"] = "train"
    return split[["path", "label", "split", "fold", "source"]]


def _from_models(kind: str, name: str, models: list[Model], default_out: Path, frame: pd.DataFrame, note: str,
                 parts: list[tuple[Model, Images, int]]) -> Target:
    meta, hparams = models[0].meta, _hparams(models[0].path)
    return Target(kind, name, parts[0][1].root, models[0].class_names, frame, note, str(meta["model_name"]),
                  int(meta["image_size"]), hparams.get("weights"), bool(hparams.get("pretrained", True)), models,
                  parts, default_out)


def run_target(run_dir: Path, data: Path | None) -> Target:
    """A training run: its best checkpoint scores its validation photos."""
    summary = read_summary(run_dir)
    if summary.status == "running":
        raise InspectError(f"{run_dir} is still running (summary.json status: running); inspect it once it ends")
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise InspectError(f"{ckpt} not found: the run ({summary.status}) has no best checkpoint to inspect")
    models = load_models([ckpt])
    images = val_images(models, data, [run_dir])
    note = f"the run's own split ({run_dir / SPLIT_FILE})"
    return _from_models("run", str(run_dir), models, run_dir / "inspect", _split_frame(run_dir), note,
                        [(models[0], images, -1)])


def sweep_target(sweep_dir: Path, data: Path | None) -> Target:
    """A k-fold sweep: each fold's photos scored by the run that validated on it (out of fold)."""
    runs = find_runs(sweep_dir)
    if not runs:
        raise InspectError(f"{sweep_dir} holds no carnet run (no summary.json in it or its sub-folders); expected a "
                           f"run directory, a k-fold sweep folder or a .ckpt file")
    not_folds = [r.path for r in runs if r.summary.fold is None]
    if not_folds:
        raise InspectError(f"{sweep_dir} holds runs that were not trained on a fold, e.g. {not_folds[0]}: pass one run "
                           f"directory, or the folder of a k-fold sweep (train.py -m data.fold=0,1,..)")
    usable = [r for r in runs if (r.path / "checkpoints" / "best.ckpt").is_file() and r.status != "running"]
    if not usable:
        raise InspectError(f"no finished fold run with checkpoints/best.ckpt under {sweep_dir}")
    for run in runs:
        if run not in usable:
            print(f"carnet-inspect: leaving out {run.path} ({run.status}, no best checkpoint): its fold is not "
                  f"scored")
    models = load_models([r.path / "checkpoints" / "best.ckpt" for r in usable])
    parts, num_folds, _ = oof_images(models, data, [r.path for r in usable])
    frame = _split_frame(usable[0].path)
    note = f"the sweep's {num_folds} folds ({len(parts)} scored)"
    return _from_models("sweep", str(sweep_dir), [p.model for p in parts], sweep_dir / "inspect", frame, note,
                        [(p.model, p.images, p.fold) for p in parts])


def drawn_frame(root: Path, num_classes: int, seed: int, val_fraction: float) -> pd.DataFrame:
    """The labelled photos of ``root`` and the side train.py would give each with ``seed`` and ``val_fraction``."""
    frame = scan_train(root, num_classes)
    split, fold = assign_split(frame.path, frame.label, seed, val_fraction)
    return frame.assign(split=split, fold=fold, source="train")


def checkpoint_target(ckpt: Path, data: Path | None, seed: int, val_fraction: float) -> Target:
    """A checkpoint: its run's validation photos when the run is found, else the split train.py draws on ``data``
    with ``seed`` (a checkpoint does not record the seed it was trained with)."""
    models = load_models([ckpt])
    try:
        run_dir = find_run_dir(models[0], None)
    except PredictError:
        run_dir = None
    if run_dir is not None:
        images = val_images(models, data, [run_dir])
        note = f"the checkpoint's run ({run_dir / SPLIT_FILE})"
        return _from_models("checkpoint", str(ckpt), models, Path("outputs/inspect"), _split_frame(run_dir), note,
                            [(models[0], images, -1)])
    if data is None:
        raise InspectError(f"{ckpt}: its training run is not found; pass --data ROOT, the data it should score")
    frame = drawn_frame(data, len(models[0].class_names), seed, val_fraction)
    val = frame[frame.split == "val"]
    images = Images(data, list(val.path), list(val.path), [int(v) for v in val.label], "validation")
    note = (f"drawn as train.py draws it with seed={seed}, val_fraction={val_fraction}: if the checkpoint trained with "
            f"another seed or data, some of these validation photos trained it")
    return _from_models("checkpoint", str(ckpt), models, Path("outputs/inspect"), frame, note,
                        [(models[0], images, -1)])


def timm_model_name(model: str) -> str:
    """``model`` as timm knows it: conf/model/<model>.yaml's ``name`` when carnet has that config, else as given;
    a name timm does not know is an :class:`InspectError` saying what it expects (it was timm's traceback)."""
    path = config_dir() / "model" / f"{model}.yaml"
    name = str(OmegaConf.load(path).get("name", model)) if path.is_file() else model
    if not TimmModel().accepts(name):
        configs = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml") if not p.stem.startswith("_"))
        raise InspectError(f"--model {model}: expected a conf/model name ({', '.join(configs)}) or "
                           f"{TimmModel().expected(name)}")
    return name


def data_target(data: Path, model: str, class_names: list[str] | None, image_size: int, weights: str | None,
                seed: int, val_fraction: float) -> Target:
    """A data root alone: no trained model; the probe's out-of-fold predictions are the model's."""
    if not (data / "train").is_dir():
        scan_train(data, 1)  # the layout error, naming the folder
    if class_names is None:
        folders = sorted((p.name for p in (data / "train").iterdir() if p.is_dir() and p.name.isdigit()), key=int)
        class_names = folders
    frame = drawn_frame(data, len(class_names), seed, val_fraction)
    note = f"drawn as train.py draws it with seed={seed}, val_fraction={val_fraction}"
    return Target("data", str(data), data, list(class_names), frame, note, timm_model_name(model), int(image_size),
                  weights, True)


def resolve(target: str | os.PathLike | None, data: str | os.PathLike | None = None, model: str | None = None,
            class_names: list[str] | None = None, image_size: int = 224, weights: str | None = None, seed: int = 42,
            val_fraction: float = 0.2) -> Target:
    """The :class:`Target` of the command line: a run directory, a sweep folder, a ``.ckpt``, or ``--data`` with
    ``--model`` alone."""
    data = Path(data) if data is not None else None
    if data is not None and not data.is_dir():
        raise InspectError(f"--data {data}: no such folder (expected a data root with train/<k>/)")
    if target is None:
        if data is None or model is None:
            raise InspectError("nothing to inspect: give a run directory, a k-fold sweep folder or a .ckpt file, or "
                               "--data ROOT with --model NAME (a probe on the data alone)")
        return data_target(data, model, class_names, image_size, weights, seed, val_fraction)
    path = Path(target)
    if not path.exists():
        raise InspectError(f"{path} does not exist: expected a run directory, a k-fold sweep folder or a .ckpt file")
    try:
        if path.is_file():
            return checkpoint_target(path, data, seed, val_fraction)
        if (path / SUMMARY_FILE).is_file():
            return run_target(path, data)
        return sweep_target(path, data)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, CarnetError):
            raise
        raise InspectError(f"{path}: {err}") from err
