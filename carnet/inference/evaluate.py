"""The labelled reports of predict: the validation report (``split=val``: every checkpoint and the ensemble on
the images no model trained on) and the out-of-fold report (``split=oof``: each fold by the one checkpoint that
never trained on it).

Both follow one skeleton (:class:`_Report`): run every view of the TTA recipe plus the plain one once, let
``tta=auto`` pick the views on these labels, print the accuracy table, then write the confusion matrix, the
predictions and the table. They differ only in how their parts pool (an ensemble over the same images, or the
folds side by side), in the table's rows and in the predictions' leading columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from rich.table import Table
from torchmetrics.functional.classification import multiclass_confusion_matrix

from carnet.artifacts import spreadsheet_safe, write_csv_atomic
from carnet.inference.ensemble import Model, ensemble
from carnet.inference.runner import Runner, console, progress_bars
from carnet.inference.selection import FoldPart, Images
from carnet.inference.tta import IDENTITY, TTA, pick_views, scores

PLAIN = TTA()  # the plain prediction: the identity view alone


def uses_tta(tta: TTA) -> bool:
    """Whether ``tta`` is more than the plain prediction."""
    views = tta.forward_views
    return len(views) > 1 or not views[0].is_identity


def describe(tta: TTA) -> str:
    """``mean(identity+hflip), beta=0.5``: the recipe in one line."""
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


# ----------------------------------------------------------------------------------------- confusion matrix


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


# ------------------------------------------------------------------------------------------------- reports


class _Report:
    """The skeleton of both reports. Each part (a checkpoint and the images it scores) is run once on every view
    of the recipe and the plain one; parts pool as an ensemble over the same images (``weights``) or side by side
    (``weights=None``: folds). Subclasses print the table and name the title and the predictions' leading columns.
    """

    name = ""  # files: confusion_<name>.png, <name>_predictions.csv, <name>_report.csv
    scope = ""  # what the predictions are called on the console

    def __init__(self, parts: Sequence[tuple[Model, Images]], weights: Sequence[float] | None, tta: TTA,
                 runner: Runner) -> None:
        self.tta, self.weights = tta, None if weights is None else list(weights)
        self.run = _with_plain(tta)
        with progress_bars() as progress:
            self.probs = [runner.view_probs(model, images, self.run, progress) for model, images in parts]
        self.part_labels = [torch.tensor(images.labels) for _, images in parts]
        self.labels = self.part_labels[0] if self.weights else torch.cat(self.part_labels)
        self.class_names = parts[0][0].class_names

    def pool(self, per_part: Sequence[torch.Tensor]) -> torch.Tensor:
        """The parts' (images, classes) probabilities as one: their weighted ensemble, or the folds in a row."""
        return ensemble(per_part, self.weights) if self.weights else torch.cat(list(per_part))

    def views(self, tta: TTA) -> list[torch.Tensor]:
        """Each part's probabilities of ``tta.forward_views``: (views, images, classes)."""
        index = _positions(self.run, tta)
        return [p[index] for p in self.probs]

    def pick(self) -> tuple[TTA, float]:
        """``tta=auto``: the subset of the recipe's views most accurate on the pooled predictions."""
        if self.weights:
            return pick_views(self.views(self.tta), self.labels, self.tta, self.weights)
        return pick_views(torch.cat(self.views(self.tta), 1), self.labels, self.tta)

    def show(self, plain: list[torch.Tensor], merged: list[torch.Tensor], chosen: TTA) -> list[dict[str, Any]]:
        """Print the accuracy table (plain and TTA ``merged`` probabilities of each part); return its rows."""
        raise NotImplementedError

    def title(self, chosen: TTA, acc: float) -> str:
        raise NotImplementedError

    def columns(self, final: torch.Tensor) -> dict[str, Any]:
        """The predictions CSV's leading columns, before one probability column per class."""
        raise NotImplementedError

    def evaluate(self, auto: bool, report_dir: Path) -> tuple[TTA, dict[str, Any]]:
        """(the TTA recipe used, the report): table on the console, confusion matrix and CSVs in ``report_dir``."""
        chosen = self.tta
        if auto:
            chosen, acc = self.pick()
            console.print(f"tta=auto picked {describe(chosen)} ({self.scope} acc {acc:.4f}, picked on these same "
                          f"images: optimistic)")
        plain = [p[0] for p in self.views(PLAIN)]  # the plain view of each part
        merged = [chosen.combine(p) for p in self.views(chosen)]
        rows = self.show(plain, merged, chosen)
        final = self.pool(merged)
        acc = scores(final, self.labels)[0]
        png = report_dir / f"confusion_{self.name}.png"
        matrix, pairs = confusion_report(final, self.labels, self.class_names, png, self.title(chosen, acc))
        frame = pd.DataFrame(final.numpy(), columns=self.class_names)
        for i, (column, values) in enumerate(self.columns(final).items()):
            frame.insert(i, column, values)
        csv = write_csv_atomic(spreadsheet_safe(frame), report_dir / f"{self.name}_predictions.csv")
        table = write_csv_atomic(spreadsheet_safe(pd.DataFrame(rows)), report_dir / f"{self.name}_report.csv")
        console.print(f"{self.scope} predictions: {csv}; confusion matrix: {png}; table: {table}")
        return chosen, {"rows": rows, "accuracy": acc, "confusion": matrix, "pairs": pairs, "tta": chosen,
                        "probs": final, "predictions": frame}


class _ValReport(_Report):
    name, scope = "val", "val"

    def __init__(self, models: Sequence[Model], images: Images, tta: TTA, runner: Runner) -> None:
        self.models, self.images = list(models), images
        super().__init__([(m, images) for m in models], [m.weight for m in models], tta, runner)

    def show(self, plain: list[torch.Tensor], merged: list[torch.Tensor], chosen: TTA) -> list[dict[str, Any]]:
        table = Table(title=f"validation accuracy on {len(self.labels)} images ({self.images.root})")
        for col, justify in (("model", "left"), ("prediction", "left"), ("accuracy", "right"), ("nll", "right"),
                             ("vs plain", "right")):
            table.add_column(col, justify=justify)
        rows: list[dict[str, Any]] = []

        def add(model: str, what: str, probs: torch.Tensor, base: float | None) -> float:
            acc, nll = scores(probs, self.labels)
            rows.append({"model": model, "prediction": what, "accuracy": acc, "nll": nll})
            table.add_row(model, what, f"{acc:.4f}", f"{nll:.4f}", "" if base is None else f"{acc - base:+.4f}")
            return acc

        named = [(i, v) for i, v in enumerate(self.run.forward_views) if not v.is_identity]
        for model, probs, plain_probs, tta_probs in zip(self.models, self.probs, plain, merged, strict=True):
            base = add(model.label, "plain", plain_probs, None)
            for i, view in named:
                add(model.label, f"view {view.name}", probs[i], base)
            if uses_tta(chosen):
                add(model.label, f"TTA {describe(chosen)}", tta_probs, base)
            table.rows[-1].end_section = True
        if len(self.models) > 1:
            base = add("ensemble", "plain", self.pool(plain), None)
            if uses_tta(chosen):
                add("ensemble", f"TTA {describe(chosen)}", self.pool(merged), base)
        console.print(table)
        return rows

    def title(self, chosen: TTA, acc: float) -> str:
        return f"validation: {len(self.models)} model(s), {describe(chosen)}, acc {acc:.4f}"

    def columns(self, final: torch.Tensor) -> dict[str, Any]:
        return {"path": self.images.paths, "label": self.images.labels, "pred": final.argmax(-1).numpy()}


class _OofReport(_Report):
    name, scope = "oof", "out-of-fold"

    def __init__(self, parts: Sequence[FoldPart], tta: TTA, runner: Runner, num_folds: int, total: int) -> None:
        self.parts, self.num_folds, self.total = list(parts), num_folds, total
        self.missing = sorted(set(range(num_folds)) - {p.fold for p in parts})
        super().__init__([(p.model, p.images) for p in parts], None, tta, runner)

    def show(self, plain: list[torch.Tensor], merged: list[torch.Tensor], chosen: TTA) -> list[dict[str, Any]]:
        has_tta = uses_tta(chosen)
        coverage = f"{len(self.labels)}/{self.total} training images"
        table = Table(title=f"out-of-fold accuracy: {len(self.parts)}/{self.num_folds} folds, {coverage}")
        for col, justify in (("fold", "right"), ("checkpoint", "left"), ("images", "right"), ("plain", "right"),
                             ("plain nll", "right")):
            table.add_column(col, justify=justify)
        if has_tta:
            table.add_column(f"TTA {describe(chosen)}", justify="right")
            table.add_column("TTA nll", justify="right")
        rows: list[dict[str, Any]] = []

        def add(fold: str, checkpoint: str, y: torch.Tensor, p: torch.Tensor, t: torch.Tensor, end: bool) -> None:
            row = {"fold": fold, "checkpoint": checkpoint, "images": len(y)}
            row["plain_accuracy"], row["plain_nll"] = scores(p, y)
            cells = [str(len(y)), f"{row['plain_accuracy']:.4f}", f"{row['plain_nll']:.4f}"]
            if has_tta:
                row["tta_accuracy"], row["tta_nll"] = scores(t, y)
                cells += [f"{row['tta_accuracy']:.4f}", f"{row['tta_nll']:.4f}"]
            rows.append(row)
            table.add_row(fold, checkpoint, *cells, end_section=end)

        for i, (part, y) in enumerate(zip(self.parts, self.part_labels, strict=True)):
            add(str(part.fold), part.model.label, y, plain[i], merged[i], i == len(self.parts) - 1)
        add("all", "out-of-fold" + (" (partial)" if self.missing else ""), self.labels, self.pool(plain),
            self.pool(merged), False)
        console.print(table)
        if self.missing:
            console.print(f"partial coverage: fold(s) {self.missing} of {self.num_folds} have no checkpoint; the "
                          f"out-of-fold accuracy covers {coverage}")
        return rows

    def title(self, chosen: TTA, acc: float) -> str:
        return (f"out-of-fold: {len(self.parts)}/{self.num_folds} folds, "
                f"{describe(chosen) if uses_tta(chosen) else 'plain'}, acc {acc:.4f}")

    def columns(self, final: torch.Tensor) -> dict[str, Any]:
        return {"path": [path for p in self.parts for path in p.images.paths], "label": self.labels.numpy(),
                "fold": [p.fold for p in self.parts for _ in p.images.paths], "prediction": final.argmax(-1).numpy()}


def evaluate_val(models: Sequence[Model], images: Images, tta: TTA, auto: bool, runner: Runner,
                 report_dir: Path) -> tuple[TTA, dict[str, Any]]:
    """Accuracy table on the validation split, confusion matrix PNG, most confused pairs; ``auto`` picks views.

    Writes ``val_predictions.csv``, ``val_report.csv`` and ``confusion_val.png`` to ``report_dir``.
    """
    return _ValReport(models, images, tta, runner).evaluate(auto, report_dir)


def evaluate_oof(parts: Sequence[FoldPart], tta: TTA, auto: bool, runner: Runner, report_dir: Path,
                 num_folds: int, total: int) -> tuple[TTA, dict[str, Any]]:
    """Out-of-fold report: every fold predicted by the one checkpoint that never trained on it, plain and TTA.

    Per-fold and overall accuracy table, ``oof_predictions.csv``, ``oof_report.csv``, ``confusion_oof.png``;
    ``auto`` picks the TTA views on the pooled out-of-fold predictions.
    """
    report = _OofReport(parts, tta, runner, num_folds, total)
    chosen, result = report.evaluate(auto, report_dir)
    rows = result["rows"]
    result.update(plain_accuracy=rows[-1]["plain_accuracy"], tta_accuracy=rows[-1].get("tta_accuracy"),
                  folds=[p.fold for p in parts], missing_folds=report.missing, num_images=len(report.labels),
                  num_train_images=total)
    return chosen, result
