"""The page's figures, computed from predictions and the split: headline scores, per-class precision/recall/F1,
the confusion matrix, the top losses, the class balance and which duplicate pairs cross the split.

The scores are scikit-learn's (cleanlab, which the page needs anyway, brings it), so they mean what they mean
everywhere else: ``precision_recall_fscore_support``, ``confusion_matrix``, ``log_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from carnet.inspection.targets import Scored


def headline(scored: Scored, num_classes: int) -> dict[str, float]:
    """Accuracy and log-loss (natural log, probabilities clipped at 1e-12) over the scored photos."""
    from sklearn.metrics import accuracy_score, log_loss

    probs = np.clip(scored.probs, 1e-12, 1.0)
    return {"photos": len(scored.labels), "accuracy": float(accuracy_score(scored.labels, probs.argmax(1))),
            "log_loss": float(log_loss(scored.labels, probs / probs.sum(1, keepdims=True),
                                       labels=list(range(num_classes))))}


def per_class(scored: Scored, class_names: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class (a class never predicted has precision 0)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(scored.labels, scored.probs.argmax(1), labels=labels,
                                                 zero_division=0)
    return pd.DataFrame({"class": list(class_names), "precision": p, "recall": r, "f1": f, "support": s})


def confusion(scored: Scored, num_classes: int) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(scored.labels, scored.probs.argmax(1), labels=list(range(num_classes)))


def predictions(scored: Scored, class_names: Sequence[str]) -> pd.DataFrame:
    """The scored photos: ``path, label, prediction`` (and ``fold`` out of fold), then each class's probability."""
    frame = pd.DataFrame({"path": scored.paths, "label": scored.labels, "prediction": scored.probs.argmax(1)})
    if scored.folds:
        frame["fold"] = scored.folds
    return pd.concat([frame, pd.DataFrame(scored.probs.round(6), columns=list(class_names))], axis=1)


def top_losses(scored: Scored, n: int) -> pd.DataFrame:
    """The ``n`` wrongly predicted photos with the highest loss (-log p(true class)): the model's most confident
    mistakes, each with its true and predicted class and both probabilities."""
    rows = np.arange(len(scored.labels))
    predicted = scored.probs.argmax(1)
    p_true = scored.probs[rows, scored.labels]
    frame = pd.DataFrame({"path": scored.paths, "label": scored.labels, "predicted": predicted,
                          "p_predicted": scored.probs[rows, predicted], "p_true": p_true,
                          "loss": -np.log(np.clip(p_true, 1e-12, 1.0)),
                          "fold": scored.folds if scored.folds else -1})
    wrong = frame[frame.predicted != frame.label]
    return wrong.sort_values(["loss", "path"], ascending=[False, True], kind="stable").head(n).reset_index(drop=True)


def class_balance(frame: pd.DataFrame, class_names: Sequence[str], by_fold: bool) -> pd.DataFrame:
    """Photos per class on each side of the split (``by_fold``: per fold), extra sources counted as train."""
    column = frame.fold.map(lambda k: f"fold {k}" if k >= 0 else "extra") if by_fold else frame.split
    table = pd.crosstab(frame.label, column).reindex(range(len(class_names)), fill_value=0)
    ordered = [c for c in ("train", "val") if c in table.columns] + sorted(c for c in table.columns
                                                                          if c not in ("train", "val"))
    table = table[ordered]
    table.index = list(class_names)
    table.columns.name = None
    return table


def pair_sides(pairs: pd.DataFrame, frame: pd.DataFrame, by_fold: bool) -> pd.DataFrame:
    """The audit's duplicate pairs with ``where`` each one is: a leak across the split (``train/val``; a sweep:
    between folds), within one side, or between the training photos and the test or extra photos; leaks and
    label conflicts first."""
    if pairs.empty:
        return pairs.assign(where=pd.Series(dtype=str), leak=pd.Series(dtype=bool))
    side = frame.set_index("path").fold if by_fold else frame.set_index("path").split

    def where(row: pd.Series) -> str:
        if row.group_a == "train" and row.group_b == "train":
            a, b = side.get(row.path_a), side.get(row.path_b)
            if a is None or b is None:
                return "train (not in the split)"
            if by_fold:
                return f"folds {a}/{b}" if a != b else f"fold {a}"
            return "/".join(sorted((a, b), key=("train", "val").index))
        return str(row.scope)

    out = pairs.assign(where=pairs.apply(where, axis=1))
    out["leak"] = out["where"].eq("train/val") | out["where"].str.startswith("folds ") | \
        out.scope.isin(["train/test", "extra/test"])
    return out.sort_values(["leak", "label_conflict", "distance"], ascending=[False, False, True],
                           kind="stable").reset_index(drop=True)
