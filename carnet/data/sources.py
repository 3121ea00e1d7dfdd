"""Extra labelled images for training (``data.extra``): other datasets, your own photos, pseudo-labels.

A source is a small YAML file, so that a dataset, its location and the meaning of its labels travel together::

    name: my_photos                # how summary.json and the audit call it
    type: folder                   # folder: <path>/<label>/*.jpg   csv: a file with columns path,label
    path: ../../data/extra/photos  # relative to this YAML's folder unless absolute
    label_map:                     # optional: their label -> class index or exact class name (null: drop)
      priora: Lada Priora
      niva: 5

Without ``label_map`` the labels must already be class indices 0..K-1 or exact class names. Labels the map does
not name are dropped and counted. In a CSV, ``path`` is relative to the CSV's folder unless absolute; further
columns (a pseudo-label's probability, say) are ignored. Extra images only ever go to the training split, and
each photo is used once (:func:`merge_sources`): a source that repeats a competition photo cannot train on a
validation photo.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from carnet.data.layout import IMAGE_EXTENSIONS
from carnet.errors import DataError

SOURCE_TYPES = ("csv", "folder")


@dataclass
class Source:
    """One parsed source YAML: where its images are and how its labels map to class indices."""

    name: str
    type: str
    path: Path  # absolute
    yaml_path: Path
    label_map: dict[str, int | None] | None = None


@dataclass
class SourceStats:
    """What reading a source kept and dropped (reported in summary.json and the audit)."""

    name: str
    read: int = 0
    kept: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)  # their label -> rows dropped

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped_unmapped": sum(self.unmapped.values()),
                "unmapped_labels": dict(self.unmapped)}


def _class_index(value: Any, class_names: Sequence[str]) -> int | None:
    """A class index from an index (int or digit string) or an exact class name; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(class_names) else None
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        return index if 0 <= index < len(class_names) else None
    return class_names.index(text) if text in class_names else None


def load_source(yaml_path: str | os.PathLike, class_names: Sequence[str]) -> Source:
    """Parse and check a source YAML; every error names the file and the key."""
    yaml_path = Path(yaml_path).expanduser().resolve()
    if not yaml_path.is_file():
        raise DataError(f"data.extra: source file {yaml_path} not found (expected a YAML with name, type, path)")
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as err:  # PyYAML's text spans lines; its problem and where are the one line
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"{yaml_path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(spec, dict):
        raise DataError(f"{yaml_path}: expected a mapping with keys name, type, path[, label_map]")
    unknown = sorted(set(spec) - {"name", "type", "path", "label_map"})
    if unknown:
        raise DataError(f"{yaml_path}: unknown key(s) {unknown}; expected name, type, path, label_map")
    for key in ("name", "type", "path"):
        if not spec.get(key):
            raise DataError(f"{yaml_path}: key '{key}' is missing or empty")
    if spec["type"] not in SOURCE_TYPES:
        raise DataError(f"{yaml_path}: type={spec['type']!r}; expected one of {list(SOURCE_TYPES)}")
    path = Path(str(spec["path"])).expanduser()
    path = (path if path.is_absolute() else yaml_path.parent / path).resolve()
    if spec["type"] == "csv" and not path.is_file():
        raise DataError(f"{yaml_path}: path {path} is not a file (type: csv expects a CSV with columns path,label)")
    if spec["type"] == "folder" and not path.is_dir():
        raise DataError(f"{yaml_path}: path {path} is not a folder (type: folder expects <path>/<label>/*.jpg)")

    label_map = None
    if spec.get("label_map") is not None:
        if not isinstance(spec["label_map"], dict):
            raise DataError(f"{yaml_path}: label_map must be a mapping their_label -> class index or class name")
        label_map = {}
        for theirs, ours in spec["label_map"].items():
            index = None if ours is None else _class_index(ours, class_names)
            if ours is not None and index is None:
                raise DataError(f"{yaml_path}: label_map[{theirs!r}] = {ours!r} is neither a class index "
                                f"0..{len(class_names) - 1} nor one of the class names {list(class_names)}")
            label_map[str(theirs)] = index
    return Source(name=str(spec["name"]), type=spec["type"], path=path, yaml_path=yaml_path, label_map=label_map)


def _raw_rows(source: Source) -> pd.DataFrame:
    """(absolute path, their label as text) for every image of the source, before mapping."""
    if source.type == "folder":
        rows = [(str(p), label_dir.name) for label_dir in sorted(source.path.iterdir()) if label_dir.is_dir()
                for p in sorted(label_dir.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        return pd.DataFrame(rows, columns=["path", "label"])
    try:
        table = pd.read_csv(source.path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise DataError(f"{source.yaml_path}: cannot read {source.path}: {err}") from err
    if not {"path", "label"} <= set(table.columns):
        raise DataError(f"{source.path} has columns {list(table.columns)}; expected a header with path,label")
    base = source.path.parent
    paths = [str(p if (p := Path(s).expanduser()).is_absolute() else (base / p).resolve()) for s in table.path]
    frame = pd.DataFrame({"path": paths, "label": table.label.str.strip()})
    missing = [p for p in frame.path if not Path(p).is_file()]
    if missing:
        raise DataError(f"{source.path} (source {source.name!r}) lists {len(missing)} image(s) that are not on "
                        f"disk, first: {missing[0]} (paths are relative to the CSV's folder unless absolute)")
    return frame


def read_source(source: Source, class_names: Sequence[str]) -> tuple[pd.DataFrame, SourceStats]:
    """The source's usable images as a frame ``path`` (absolute), ``label`` (class index), ``source``."""
    raw = _raw_rows(source)
    stats = SourceStats(source.name, read=len(raw))
    if source.label_map is not None:
        mapped = raw.label.map(lambda t: source.label_map.get(t))
        stats.unmapped = dict(Counter(raw.label[mapped.isna()]))
    else:
        mapped = raw.label.map(lambda t: _class_index(t, class_names))
        bad = sorted(set(raw.label[mapped.isna()]))
        if bad:
            raise DataError(f"{source.yaml_path}: label(s) {bad[:10]} of source {source.name!r} are neither class "
                            f"indices 0..{len(class_names) - 1} nor class names; add a label_map that maps them "
                            f"(labels it leaves out are dropped)")
    keep = mapped.notna()
    frame = pd.DataFrame({"path": raw.path[keep], "label": mapped[keep].astype(int), "source": source.name})
    stats.kept = len(frame)
    return frame.reset_index(drop=True), stats


def read_sources(yaml_paths: Sequence[str | os.PathLike] | str | None,
                 class_names: Sequence[str]) -> tuple[pd.DataFrame, dict[str, SourceStats]]:
    """All ``data.extra`` sources as one frame (``path, label, source``) plus per-source stats."""
    if isinstance(yaml_paths, (str, os.PathLike)):
        yaml_paths = [yaml_paths]
    frames, stats = [], {}
    for yaml_path in yaml_paths or []:
        source = load_source(yaml_path, class_names)
        if source.name in stats or source.name == "train":
            raise DataError(f"{source.yaml_path}: source name {source.name!r} is already used; names must be "
                            f"unique and not 'train'")
        frame, stats[source.name] = read_source(source, class_names)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", "label", "source"])
    return frame.astype({"label": int}), stats


def merge_sources(own: pd.DataFrame, extra: pd.DataFrame, root: str | os.PathLike) -> pd.DataFrame:
    """The competition images (``path`` relative to ``root``, source "train") and the extra ones as one frame
    (``path, label, source``) in which every photo appears once.

    A photo is its file: paths that resolve to the same file (a source pointing at ``data/train``, a photo in two
    sources, a symlink) are one photo. A repeat with the same label is dropped with a warning and the first row
    kept, competition images first, so a repeated photo keeps its competition split and never trains while it
    validates. A photo given two labels is refused, naming the file, both labels and where each came from.
    """
    frame = pd.concat([own.assign(source="train"), extra], ignore_index=True)
    files = pd.Series([os.path.realpath(Path(root) / p) for p in frame.path], index=frame.index)  # root/abs = abs
    labels = frame.label.groupby(files).nunique()
    if (labels > 1).any():
        clash = frame[files == labels.index[labels > 1][0]].drop_duplicates("label")
        (_, a), (_, b) = list(clash.iterrows())[:2]
        raise DataError(f"{a.path} has label {a.label} from {a.source!r} and label {b.label} from {b.source!r}"
                        f"{f' (as {b.path})' if b.path != a.path else ''}: {int((labels > 1).sum())} photo(s) "
                        f"with two labels; expected one label per photo (fix the source or its label_map)")
    repeated = files.duplicated()
    if repeated.any():
        kept = frame.loc[files[~repeated].index].set_index(files[~repeated])
        named = [f"{r.path} ({r.source}, already from {kept.at[files[i], 'source']})"
                 for i, r in frame[repeated].head(3).iterrows()]
        warnings.warn(f"leaving out {int(repeated.sum())} image(s) listed more than once, each photo used once "
                      f"with its first listing (competition data first, then data.extra in order): "
                      f"{'; '.join(named)}{'; ...' if repeated.sum() > 3 else ''}", stacklevel=2)
    return frame[~repeated.to_numpy()].reset_index(drop=True)
