"""Label corrections (``data.corrections=label_issues.csv``): the user's verdicts on suspected label errors, applied
to the photos a run trains and validates on, without touching the data folder.

``carnet-inspect`` writes ``label_issues.csv`` (``rank,path,split,given,suggested,score,action``); the user sets each
row's ``action``: ``keep`` (the label is right), ``drop`` (leave the photo out) or ``relabel`` (use ``suggested``,
which may be edited to any class name or index). Rows are matched by ``path`` as ``split.csv`` records it.

Corrections are applied after the split is drawn, so no photo changes side because another was dropped or
relabelled (:mod:`carnet.data.splits` decides each photo's side from its path alone, but its rare per-class
exceptions look at labels and class sizes): a relabelled photo keeps its side, a dropped one leaves it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from carnet.errors import DataError

ACTIONS = ("keep", "drop", "relabel")
REQUIRED = ("path", "action")


def _class_index(value: Any, class_names: Sequence[str], where: str) -> int:
    """A class given by its exact name or its index, as label_issues.csv may hold either."""
    text = str(value).strip()
    if text in class_names:
        return list(class_names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise DataError(f"{where}: {text!r} is not a class; expected one of {list(class_names)} or an index "
                    f"0..{len(class_names) - 1}")


def read_corrections(path: str | os.PathLike, class_names: Sequence[str]) -> pd.DataFrame:
    """The corrections of ``path``: frame ``path, action, label`` (label: the new class index for ``relabel``,
    the given one, if the file names it, otherwise; -1 when unknown), one row per photo. Every mistake in the file
    is one :class:`DataError` naming the file, the row and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.corrections={path}: file not found (expected the label_issues.csv written by "
                        f"carnet-inspect, with an action per row: {', '.join(ACTIONS)})")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise DataError(f"data.corrections={path} cannot be read as CSV ({type(err).__name__}: {err})") from err
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"data.corrections={path} has columns {list(table.columns)}; expected at least "
                        f"{', '.join(REQUIRED)} (and suggested, for relabel)")
    rows = []
    for i, row in table.iterrows():
        where = f"{path} row {i + 2}"  # the header is line 1
        action = row["action"].strip().lower()
        if action not in ACTIONS:
            raise DataError(f"{where} ({row['path']}): action {row['action']!r}; expected one of {', '.join(ACTIONS)}")
        given = _class_index(row["given"], class_names, f"{where} column given") \
            if str(row.get("given", "")).strip() else -1
        label = given
        if action == "relabel":
            if not str(row.get("suggested", "")).strip():
                raise DataError(f"{where} ({row['path']}): action relabel needs the new class in column suggested")
            label = _class_index(row["suggested"], class_names, f"{where} column suggested")
        rows.append((row["path"].strip(), action, label, given))
    frame = pd.DataFrame(rows, columns=["path", "action", "label", "given"])
    repeated = frame.path[frame.path.duplicated()]
    if len(repeated):
        raise DataError(f"{path}: photo {repeated.iloc[0]} has {int((frame.path == repeated.iloc[0]).sum())} rows; "
                        f"expected one row per photo")
    return frame


def apply_corrections(frame: pd.DataFrame, corrections: pd.DataFrame, source: str | os.PathLike
                      ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``frame`` (``path, label, ...``: the photos after the split) with the drops and relabels of ``corrections``
    applied; and what was done, for summary.json. A row naming a photo that is not in ``frame``, or a ``given``
    label that is no longer the photo's label (the data changed since the file was written), is an error."""
    source = Path(source)
    index = pd.Series(frame.index, index=frame.path)
    unknown = corrections.path[~corrections.path.isin(index.index)]
    if len(unknown):
        raise DataError(f"data.corrections={source}: {len(unknown)} path(s) are not photos of this data set, first: "
                        f"{unknown.iloc[0]} (expected paths as split.csv records them; was the file written for "
                        f"another data root?)")
    rows = index[corrections.path].to_numpy()
    current = frame.label.to_numpy()[rows]
    stale = (corrections.given.to_numpy() >= 0) & (corrections.given.to_numpy() != current)
    if stale.any():
        k = int(stale.argmax())
        raise DataError(f"data.corrections={source}: {corrections.path.iloc[k]} is labelled {int(current[k])} in the "
                        f"data but {int(corrections.given.iloc[k])} in the file (the data changed since the file "
                        f"was written: run carnet-inspect again)")
    frame = frame.copy()
    relabel = corrections.action.to_numpy() == "relabel"
    frame.loc[rows[relabel], "label"] = corrections.label.to_numpy()[relabel]
    drop = corrections.action.to_numpy() == "drop"
    frame = frame.drop(index=rows[drop]).reset_index(drop=True)
    stats = {"file": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
             "rows": len(corrections), "dropped": int(drop.sum()), "relabelled": int(relabel.sum()),
             "kept": int((corrections.action == "keep").sum())}
    return frame, stats
