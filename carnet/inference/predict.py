"""Checkpoints -> Kaggle submission (``split=test``), an honest validation report (``split=val``) or the
out-of-fold report of a k-fold sweep (``split=oof``).

Every checkpoint brings its own image size, normalisation and class names (``checkpoint["carnet"]``), so models
of different architectures and sizes can be ensembled: each gets its own loader, and the ensemble averages
class probabilities. TTA views and their merge live in :mod:`carnet.inference.tta`. ``predict.py`` at the top level is
the thin ``@hydra.main`` wrapper around :func:`predict`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from carnet.errors import CarnetError

matplotlib.use("Agg")  # files only
import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix

from carnet.artifacts import SPLIT_FILE, SUMMARY_FILE, write_csv_atomic
from carnet.config import config_dir
from carnet.data.datamodule import ImageDataset, default_num_workers
from carnet.data.layout import DataError, read_test
from carnet.data.transforms import build_eval_transform
from carnet.errors import exit_on_error
from carnet.inference.oof import oof_frame
from carnet.inference.tta import IDENTITY, TTA, build_views, pick_views, view_logits
from carnet.models.checkpoint import CheckpointError, load_checkpoint
from carnet.models.network import CarNet

log = logging.getLogger(__name__)
console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: room for the report table instead of rich's 80 columns
    console.width = 120

SUBMISSION_COLUMNS = ["Id", "Category"]


class PredictError(CarnetError):
    """predict cannot go on as configured; the message names the file, key or value at fault."""


@dataclass
class Model:
    """A loaded checkpoint: the network, its metadata and its weight in the ensemble."""

    path: Path
    net: CarNet
    meta: dict[str, Any]
    weight: float = 1.0
    label: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


@dataclass
class Images:
    """The images to predict: paths relative to ``root``, ``ids`` to report them by, labels (-1 = unknown)."""

    root: Path
    paths: list[str]
    ids: list[str]
    labels: list[int] = field(default_factory=list)
    what: str = "test"


# ---------------------------------------------------------------------------------------------- checkpoints


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def _label(path: Path) -> str:
    """A short name: ``<run>/best.ckpt`` for a checkpoint in its run directory, else the file name."""
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def load_models(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> list[Model]:
    """Load every checkpoint of the ensemble and check that they predict the same classes."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise PredictError("ckpt is empty: expected a checkpoint path or a list ckpt=[a.ckpt,b.ckpt]")
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise PredictError(f"weights has {len(weights)} value(s) for {len(paths)} checkpoint(s); expected one each")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PredictError(f"weights={weights}: expected non-negative values with a positive sum")
    models = []
    for i, (path, weight) in enumerate(zip(paths, weights, strict=True)):
        try:
            net, meta = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as err:  # a carnet checkpoint whose weights do not fit its own metadata
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err})") from err
        label = _label(path) if len(paths) == 1 else f"#{i + 1} {_label(path)}"
        models.append(Model(path, net, meta, float(weight), label))
    first = models[0]
    for other in models[1:]:
        if other.class_names != first.class_names:
            raise PredictError(
                f"checkpoints predict different classes: {first.path} has {len(first.class_names)} "
                f"{first.class_names}, {other.path} has {len(other.class_names)} {other.class_names}; an ensemble "
                f"needs the same class names in the same order")
    return models


# ------------------------------------------------------------------------------------------------- images


class _CheckedDataset(ImageDataset):
    """ImageDataset that reports an undecodable file instead of raising inside a loader worker.

    A worker's exception reaches the main process as a wrapped traceback string; returning the reason lets
    predict raise one clear :class:`DataError` naming the file.
    """

    def __init__(self, *args: Any, image_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image, label = super().__getitem__(index)
            return image, label, ""
        except Exception as err:  # PIL and OpenCV raise many types for bad files
            return torch.zeros(3, self.image_size, self.image_size), self.labels[index], \
                f"{type(err).__name__}: {err}"


def test_images(root: str | os.PathLike) -> Images:
    """The test images in ``sample-submission.csv`` order (read_test checks the file and the images exist)."""
    frame = read_test(root)
    return Images(Path(root), list(frame.path), list(frame.Id), [-1] * len(frame), "test")


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
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        root = json.loads(summary.read_text()).get("data_root")
        return Path(root) if root else None
    return None


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


@dataclass
class FoldPart:
    """One fold of a k-fold sweep: the checkpoint of the run that validated on it, and that fold's images."""

    fold: int
    model: Model
    run_dir: Path
    images: Images


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
        summary = json.loads((run / SUMMARY_FILE).read_text()) if (run / SUMMARY_FILE).is_file() else {}
        columns = pd.read_csv(run / SPLIT_FILE, nrows=0).columns
        if summary.get("fold") is None or "fold" not in columns:
            why = (f"{run / SUMMARY_FILE} has no 'fold'" if "fold" in columns
                   else f"{run / SPLIT_FILE} has no 'fold' column")
            raise PredictError(f"split=oof: checkpoint {model.path} is not from a k-fold run ({why}); pass the "
                               f"best.ckpt of each run of `train.py -m data.num_folds=K data.fold=0,1,..`")
        runs.append(run)
        folds.append(int(summary["fold"]))
    try:
        frame = oof_frame(runs)
    except DataError as err:
        named = "; ".join(f"{m.path} -> run {r}" for m, r in zip(models, runs, strict=True))
        raise PredictError(f"split=oof: {err} (checkpoints: {named})") from err
    split = pd.read_csv(runs[0] / SPLIT_FILE)
    total = int(split.get("source", pd.Series("train", index=split.index)).eq("train").sum())
    num_folds = int(json.loads((runs[0] / SUMMARY_FILE).read_text())["num_folds"])
    parts = []
    for model, run, fold in zip(models, runs, folds, strict=True):
        rows = frame[frame.fold == fold]
        data_root = Path(root) if root is not None else _run_data_root(run, model)
        if data_root is None:
            raise PredictError(f"split=oof: the run {run} does not record its data root; pass data.root=")
        parts.append(FoldPart(fold, model, run, _split_images(data_root, rows, run / SPLIT_FILE, "out-of-fold")))
    return sorted(parts, key=lambda p: p.fold), num_folds, total


# ---------------------------------------------------------------------------------------------- inference


@dataclass
class Runner:
    """Batched inference settings: device, loader, memory format and mixed precision."""

    device: str = "auto"
    batch_size: int = 32
    num_workers: int | str = "auto"
    channels_last: bool = True
    amp: bool | str = "auto"
    draft: bool = True

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.num_workers = default_num_workers() if self.num_workers in ("auto", None) else int(self.num_workers)
        if self.amp == "auto":
            self.amp = self.device.startswith("cuda")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        kind = torch.device(self.device).type
        dtype = torch.bfloat16 if kind == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(kind, dtype=dtype)

    def loader(self, images: Images, meta: dict[str, Any]) -> DataLoader:
        """A loader feeding the model what its checkpoint says (size, normalisation, interpolation, crop)."""
        size, crop_pct = int(meta["image_size"]), float(meta.get("crop_pct", 1.0))
        transform = build_eval_transform(size, meta["mean"], meta["std"], meta.get("interpolation", "bicubic"),
                                         crop_pct)
        # draft: decode JPEGs at a reduced DCT scale that still covers the resize target (2-4x less decoding).
        min_side = max(size, round(size / crop_pct)) if self.draft else None
        dataset = _CheckedDataset(images.root, images.paths, images.labels, transform, min_side=min_side,
                                  image_size=size)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.device.startswith("cuda"))

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        net = net.to(self.device).eval()
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    @torch.inference_mode()
    def view_probs(self, model: Model, images: Images, tta: TTA, progress: Progress | None = None) -> torch.Tensor:
        """Softmax probabilities of every view in ``tta.forward_views``: (views, images, classes) on the CPU."""
        net = self.prepare(model.net)
        views = tta.forward_views
        task = progress.add_task(f"{model.label} {images.what}", total=len(images.paths)) if progress else None
        outs, seen = [], 0
        for batch, _, errors in self.loader(images, model.meta):
            bad = [(i, e) for i, e in enumerate(errors) if e]
            if bad:
                i, why = bad[0]
                path = images.root / images.paths[seen + i]
                raise DataError(f"cannot decode {images.what} image {path} ({why}); replace or remove the file"
                                + (f" and its row in {images.root / 'sample-submission.csv'}"
                                   if images.what == "test" else ""))
            batch = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = view_logits(net, batch, views)
            outs.append(logits.softmax(-1).cpu())
            seen += len(batch)
            if progress is not None:
                progress.advance(task, len(batch))
        model.net = net.cpu() if self.device != "cpu" else net  # free the GPU for the next model
        return torch.cat(outs, 1)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("img"),
                    TimeRemainingColumn(), console=console, transient=False)


def ensemble(probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the models' (images, classes) probabilities."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    w = w / w.sum()
    return sum(wi * p for wi, p in zip(w.tolist(), probs, strict=True))


# ------------------------------------------------------------------------------------------------ outputs


def write_submission(ids: Sequence[str], probs: torch.Tensor, class_names: Sequence[str],
                     out: str | os.PathLike) -> tuple[Path, Path]:
    """``submission.csv`` (``Id,Category``, integer class) and ``probs.csv`` (one column per class) next to it."""
    out = Path(out)
    table = pd.DataFrame(probs.numpy(), columns=list(class_names))
    table.insert(0, "Id", list(ids))
    probs_path = write_csv_atomic(table, out.with_name("probs.csv"))
    submission = pd.DataFrame({"Id": list(ids), "Category": probs.argmax(-1).numpy().astype(int)})
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        rows.to_csv(tmp / "pseudo.csv", index=False)
        counts.to_csv(tmp / "counts.csv", index=False)
        (tmp / "source.yaml").write_text(
            f"# carnet pseudo-labels: {len(rows)} of {len(keep)} test images with max probability >= {threshold}\n"
            f"# from: {', '.join(str(s) for s in sources)}\n"
            "name: pseudo\ntype: csv\npath: pseudo.csv\n")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    table = Table(title=f"pseudo-labels: {len(rows)}/{len(keep)} test images >= {threshold}")
    table.add_column("class")
    table.add_column("count", justify="right")
    for row in counts.itertuples():
        table.add_row(f"{row.label} {row.class_name}", str(row.count))
    console.print(table)
    console.print(f"pseudo-label source: {folder / 'source.yaml'}")
    return folder


def _scores(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    acc = (probs.argmax(-1) == labels).float().mean().item()
    nll = -torch.log(probs.gather(-1, labels[:, None]).clamp_min(1e-12)).mean().item()
    return acc, nll


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Confusion matrix heat map (rows: true class, columns: predicted), counts written in the cells."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.55 * n), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() or 1
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > top / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confused_pairs(matrix: np.ndarray, class_names: Sequence[str], top: int = 5) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) mistakes, most frequent first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    pairs = [np.unravel_index(k, off.shape) for k in order]
    return [(class_names[i], class_names[j], int(off[i, j])) for i, j in pairs if off[i, j] > 0]


# ------------------------------------------------------------------------------------------------- driver


def confusion_report(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], png: Path,
                     title: str) -> tuple[np.ndarray, list[tuple[str, str, int]]]:
    """Confusion-matrix PNG (creating its folder) and the most confused class pairs on the console."""
    matrix = multiclass_confusion_matrix(probs.argmax(-1), labels, num_classes=len(class_names)).numpy()
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_confusion(matrix, class_names, png, title)
    pairs = confused_pairs(matrix, class_names)
    if pairs:
        console.print("most confused (true -> predicted: count): "
                      + "; ".join(f"{t} -> {p}: {n}" for t, p, n in pairs))
    return matrix, pairs


def build_tta(cfg: DictConfig | dict[str, Any] | bool | None) -> tuple[TTA, bool]:
    """(TTA recipe, auto) from the ``tta`` config group; false/None -> plain prediction."""
    if cfg in (None, False) or (hasattr(cfg, "get") and not cfg.get("enabled", True)):
        return TTA(), False
    if cfg is True:
        cfg = {"views": {"identity": {}, "hflip": {"hflip": True}}}
    spec = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    tta = TTA(tuple(build_views(spec.get("views"))), spec.get("merge", "mean"), spec.get("beta"))
    return tta, bool(spec.get("auto", False))


def _describe(tta: TTA) -> str:
    names = "+".join(v.name for v in tta.views)
    return f"{tta.merge}({names})" + (f", beta={tta.beta}" if tta.beta is not None else "")


def _with_plain(tta: TTA) -> TTA:
    """The same recipe with the plain view first among the views run (for the report's plain rows)."""
    if any(v.is_identity for v in tta.forward_views):
        return tta
    return TTA((IDENTITY, *tta.views), tta.merge, tta.beta)


def _positions(run: TTA, tta: TTA) -> list[int]:
    """Where each of ``tta.forward_views`` sits in ``run.forward_views`` (any identity view is the plain one)."""
    order = run.forward_views
    plain_at = next(i for i, v in enumerate(order) if v.is_identity)
    names = [v.name for v in order]
    return [plain_at if view.is_identity else names.index(view.name) for view in tta.forward_views]


def evaluate_val(models: Sequence[Model], images: Images, tta: TTA, auto: bool, runner: Runner,
                 report_dir: Path) -> tuple[TTA, dict[str, Any]]:
    """Accuracy table on the validation split, confusion matrix PNG, most confused pairs; ``auto`` picks views."""
    run = _with_plain(tta)
    labels = torch.tensor(images.labels)
    with _progress() as progress:
        per_model = [runner.view_probs(m, images, run, progress) for m in models]
    weights = [m.weight for m in models]
    plain_at = next(i for i, v in enumerate(run.forward_views) if v.is_identity)

    chosen = tta
    if auto:
        candidates = [p[_positions(run, tta)] for p in per_model]
        chosen, acc = pick_views(candidates, labels, tta, weights)
        console.print(f"tta=auto picked {_describe(chosen)} (val acc {acc:.4f}, picked on these same images: "
                      f"optimistic)")
    chosen_index = _positions(run, chosen)

    table = Table(title=f"validation accuracy on {len(labels)} images ({images.root})")
    for col, justify in (("model", "left"), ("prediction", "left"), ("accuracy", "right"), ("nll", "right"),
                         ("vs plain", "right")):
        table.add_column(col, justify=justify)
    rows: list[dict[str, Any]] = []

    def add(model: str, what: str, probs: torch.Tensor, base: float | None, end_section: bool = False) -> None:
        acc, nll = _scores(probs, labels)
        rows.append({"model": model, "prediction": what, "accuracy": acc, "nll": nll})
        delta = "" if base is None else f"{acc - base:+.4f}"
        table.add_row(model, what, f"{acc:.4f}", f"{nll:.4f}", delta, end_section=end_section)

    final_per_model = []
    for model, probs in zip(models, per_model, strict=True):
        plain_acc = _scores(probs[plain_at], labels)[0]
        add(model.label, "plain", probs[plain_at], None)
        if len(tta.views) > 1 or not tta.views[0].is_identity:
            for i, view in enumerate(run.forward_views):
                if not view.is_identity:
                    add(model.label, f"view {view.name}", probs[i], plain_acc)
        merged = chosen.combine(probs[chosen_index])
        final_per_model.append(merged)
        if len(chosen.forward_views) > 1 or not chosen.views[0].is_identity:
            add(model.label, f"TTA {_describe(chosen)}", merged, plain_acc)
        table.rows[-1].end_section = True
    final = final_per_model[0]
    if len(models) > 1:
        plain = ensemble([p[plain_at] for p in per_model], weights)
        plain_acc = _scores(plain, labels)[0]
        add("ensemble", "plain", plain, None)
        final = ensemble(final_per_model, weights)
        if len(chosen.forward_views) > 1 or not chosen.views[0].is_identity:
            add("ensemble", f"TTA {_describe(chosen)}", final, plain_acc)
    console.print(table)

    class_names = models[0].class_names
    png = report_dir / "confusion_val.png"
    acc = _scores(final, labels)[0]
    matrix, pairs = confusion_report(final, labels, class_names, png,
                                     f"validation: {len(models)} model(s), {_describe(chosen)}, acc {acc:.4f}")
    frame = pd.DataFrame(final.numpy(), columns=class_names)
    frame.insert(0, "path", images.paths)
    frame.insert(1, "label", images.labels)
    frame.insert(2, "pred", final.argmax(-1).numpy())
    write_csv_atomic(frame, report_dir / "val_predictions.csv")
    write_csv_atomic(pd.DataFrame(rows), report_dir / "val_report.csv")
    console.print(f"confusion matrix: {png}; table: {report_dir / 'val_report.csv'}")
    return chosen, {"rows": rows, "accuracy": acc, "confusion": matrix, "pairs": pairs, "tta": chosen,
                    "probs": final}


def evaluate_oof(parts: Sequence[FoldPart], tta: TTA, auto: bool, runner: Runner, report_dir: Path,
                 num_folds: int, total: int) -> tuple[TTA, dict[str, Any]]:
    """Out-of-fold report: every fold predicted by the one checkpoint that never trained on it, plain and TTA.

    Per-fold and overall accuracy table, ``oof_predictions.csv``, ``oof_report.csv``, ``confusion_oof.png``;
    ``auto`` picks the TTA views on the pooled out-of-fold predictions.
    """
    run = _with_plain(tta)
    with _progress() as progress:
        per_fold = [runner.view_probs(p.model, p.images, run, progress) for p in parts]
    plain_at = next(i for i, v in enumerate(run.forward_views) if v.is_identity)
    fold_labels = [torch.tensor(p.images.labels) for p in parts]
    labels = torch.cat(fold_labels)
    chosen = tta
    if auto:
        pooled = torch.cat([probs[_positions(run, tta)] for probs in per_fold], 1)
        chosen, acc = pick_views(pooled, labels, tta)
        console.print(f"tta=auto picked {_describe(chosen)} (out-of-fold acc {acc:.4f}, picked on these same "
                      f"images: optimistic)")
    has_tta = len(chosen.forward_views) > 1 or not chosen.views[0].is_identity
    chosen_index = _positions(run, chosen)
    plain = [probs[plain_at] for probs in per_fold]
    merged = [chosen.combine(probs[chosen_index]) for probs in per_fold]

    missing = sorted(set(range(num_folds)) - {p.fold for p in parts})
    coverage = f"{len(labels)}/{total} training images"
    table = Table(title=f"out-of-fold accuracy: {len(parts)}/{num_folds} folds, {coverage}")
    for col, justify in (("fold", "right"), ("checkpoint", "left"), ("images", "right"), ("plain", "right"),
                         ("plain nll", "right")):
        table.add_column(col, justify=justify)
    if has_tta:
        table.add_column(f"TTA {_describe(chosen)}", justify="right")
        table.add_column("TTA nll", justify="right")
    rows: list[dict[str, Any]] = []

    def add(fold: str, checkpoint: str, y: torch.Tensor, p: torch.Tensor, t: torch.Tensor, end: bool) -> None:
        row = {"fold": fold, "checkpoint": checkpoint, "images": len(y)}
        row["plain_accuracy"], row["plain_nll"] = _scores(p, y)
        cells = [str(len(y)), f"{row['plain_accuracy']:.4f}", f"{row['plain_nll']:.4f}"]
        if has_tta:
            row["tta_accuracy"], row["tta_nll"] = _scores(t, y)
            cells += [f"{row['tta_accuracy']:.4f}", f"{row['tta_nll']:.4f}"]
        rows.append(row)
        table.add_row(fold, checkpoint, *cells, end_section=end)

    for i, (part, y) in enumerate(zip(parts, fold_labels, strict=True)):
        add(str(part.fold), part.model.label, y, plain[i], merged[i], i == len(parts) - 1)
    plain_all, final = torch.cat(plain), torch.cat(merged)
    add("all", "out-of-fold" + (" (partial)" if missing else ""), labels, plain_all, final, False)
    console.print(table)
    if missing:
        console.print(f"partial coverage: fold(s) {missing} of {num_folds} have no checkpoint; the out-of-fold "
                      f"accuracy covers {coverage}")

    class_names = parts[0].model.class_names
    acc = _scores(final, labels)[0]
    png = report_dir / "confusion_oof.png"
    matrix, pairs = confusion_report(final, labels, class_names, png, f"out-of-fold: {len(parts)}/{num_folds} folds, "
                     f"{_describe(chosen) if has_tta else 'plain'}, acc {acc:.4f}")
    frame = pd.DataFrame(final.numpy(), columns=class_names)
    frame.insert(0, "path", [path for p in parts for path in p.images.paths])
    frame.insert(1, "label", labels.numpy())
    frame.insert(2, "fold", [p.fold for p in parts for _ in p.images.paths])
    frame.insert(3, "prediction", final.argmax(-1).numpy())
    csv = write_csv_atomic(frame, report_dir / "oof_predictions.csv")
    write_csv_atomic(pd.DataFrame(rows), report_dir / "oof_report.csv")
    console.print(f"out-of-fold predictions: {csv}; confusion matrix: {png}; table: {report_dir / 'oof_report.csv'}")
    return chosen, {"rows": rows, "accuracy": acc, "plain_accuracy": rows[-1]["plain_accuracy"],
                    "tta_accuracy": rows[-1].get("tta_accuracy"), "folds": [p.fold for p in parts],
                    "missing_folds": missing, "num_images": len(labels), "num_train_images": total,
                    "confusion": matrix, "pairs": pairs, "tta": chosen, "probs": final, "predictions": frame}


def predict_probs(models: Sequence[Model], images: Images, tta: TTA, runner: Runner) -> torch.Tensor:
    """Ensemble of the models' TTA-merged probabilities on ``images``: (images, classes)."""
    with _progress() as progress:
        merged = [tta.combine(runner.view_probs(m, images, tta, progress)) for m in models]
    return ensemble(merged, [m.weight for m in models])


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run predict as configured (conf/predict.yaml); return what it wrote and measured."""
    started = time.time()
    if cfg.split not in ("test", "val", "oof"):
        raise PredictError(f"split={cfg.split}: expected test (submission), val (validation report) or oof "
                           f"(out-of-fold report of k-fold runs)")
    models = load_models(_as_list(cfg.ckpt), _as_list(cfg.get("weights")) or None)
    tta, auto = build_tta(cfg.get("tta"))
    runner = Runner(device=cfg.device, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                    channels_last=cfg.channels_last, amp=cfg.amp, draft=cfg.data.draft)
    out = Path(cfg.out)
    report_dir = Path(cfg.report_dir) if cfg.get("report_dir") else out.parent
    result: dict[str, Any] = {"models": [str(m.path) for m in models]}

    if cfg.split == "oof":  # each image scored by its own fold's checkpoint: no ensemble, so no weights
        if _as_list(cfg.get("weights")) or (cfg.get("pseudo_label") or {}).get("threshold") is not None:
            console.print("weights and pseudo_label are ignored with split=oof (one checkpoint per fold)")
        parts, num_folds, total = oof_images(models, cfg.data.root, _as_list(cfg.get("run_dir")))
        tta, report = evaluate_oof(parts, tta, auto, runner, report_dir, num_folds, total)
        result.update(oof=report, tta=tta, seconds=time.time() - started)
        return result

    if cfg.split == "val" or auto:
        val = val_images(models, cfg.data.root, _as_list(cfg.get("run_dir")))
        tta, report = evaluate_val(models, val, tta, auto, runner, report_dir)
        result.update(val=report, tta=tta)
        if cfg.split == "val":
            if (cfg.get("pseudo_label") or {}).get("threshold") is not None:
                console.print("pseudo_label.threshold is ignored with split=val (pseudo-labels come from test images)")
            result["seconds"] = time.time() - started
            return result

    images = test_images(cfg.data.root or "data")
    probs = predict_probs(models, images, tta, runner)
    submission, probs_path = write_submission(images.ids, probs, models[0].class_names, out)
    console.print(f"wrote {submission} ({len(images.ids)} rows) and {probs_path}"
                  + (f" with TTA {_describe(tta)}" if len(tta.forward_views) > 1 else ""))
    result.update(submission=submission, probs_csv=probs_path, probs=probs, ids=images.ids, tta=tta)

    pseudo = cfg.get("pseudo_label") or {}
    if pseudo.get("threshold") is not None:
        name = pseudo.get("name") or time.strftime("%Y-%m-%d_%H-%M-%S")
        result["pseudo"] = write_pseudo_labels(images, probs, models[0].class_names, float(pseudo.threshold),
                                               Path(pseudo.dir) / name, [m.path for m in models])
    result["seconds"] = time.time() - started
    return result


def quote_tta_option(argv: list[str]) -> list[str]:
    """``tta=true`` / ``tta=false`` as the names of the tta group's options (conf/tta/true.yaml, false.yaml).

    Hydra's override grammar reads a bare true/false as a boolean and refuses it for a config group, so the
    value is quoted before Hydra parses the command line.
    """
    return [f"tta='{m[1].lower()}'" if (m := re.fullmatch(r"tta=(true|false)", a, re.IGNORECASE)) else a
            for a in argv]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def _main(cfg: DictConfig) -> float | None:
    """Returns the validation (split=val) or out-of-fold (split=oof) accuracy: what a TTA sweep would maximise."""
    with exit_on_error("predict"):
        result = predict(cfg)
    for report in ("oof", "val"):
        if report in result:
            return result[report]["accuracy"]
    return None


def main() -> None:
    """``carnet-predict ckpt=PATH [tta=true] [split=val|oof]`` (conf/predict.yaml)."""
    sys.argv = quote_tta_option(sys.argv)
    _main()


if __name__ == "__main__":
    main()
