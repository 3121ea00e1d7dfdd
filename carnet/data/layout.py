"""The Kaggle layout on disk: scanning and checking ``train/<k>/``, ``train.csv``, ``test_upload/``.

Layout (sf-dl-car-classification): ``root/train/<k>/*.jpg`` with k the class index, ``root/train.csv``
(``Id,Category``, optional), ``root/test_upload/*.jpg`` and ``root/sample-submission.csv`` (``Id,Category``).
No carnet imports: everything else in :mod:`carnet.data` builds on this module.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from carnet.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


GET_DATA_HINT = (
    "Get the real data with `make data` (Kaggle competition sf-dl-car-classification, unzipped to data/), "
    "or write a synthetic dataset in the same layout with `carnet-demo DIR`, then pass data.root=DIR."
)


def scan_train(root: str | os.PathLike, num_classes: int) -> pd.DataFrame:
    """List labelled images as a frame of ``path`` (relative to root) and ``label``, checking the layout.

    ``train.csv`` is the source of labels when present (every row must have its file in ``train/<Category>/``);
    otherwise the class folders are. Class folders must be named 0..num_classes-1 and must not be empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (expected a folder with train/<k>/). {GET_DATA_HINT}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} does not exist: expected class folders train/0 .. "
                        f"train/{num_classes - 1}. {GET_DATA_HINT}")
    expected = {str(k) for k in range(num_classes)}
    folders = {p.name for p in train_dir.iterdir() if p.is_dir()}
    unknown = sorted(folders - expected)
    if unknown:
        raise DataError(f"{train_dir} has class folders {unknown} that are not class indices 0..{num_classes - 1} "
                        f"(data.class_names lists {num_classes} classes)")
    files = {k: sorted(p.name for p in (train_dir / str(k)).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
             for k in range(num_classes) if (train_dir / str(k)).is_dir()}
    empty = [str(train_dir / str(k)) for k in range(num_classes) if not files.get(k)]
    if empty:
        raise DataError(f"no images in class folder(s) {', '.join(empty)}: every class needs at least one "
                        f"image. {GET_DATA_HINT}")

    csv_path = root / "train.csv"
    if csv_path.exists():
        table = _unique_ids(_read_id_table(csv_path), csv_path)
        bad = table[(table.Category < 0) | (table.Category >= num_classes)]
        if len(bad):
            raise DataError(f"{csv_path}: Category {bad.Category.iloc[0]} (Id {bad.Id.iloc[0]}) is not a class "
                            f"index 0..{num_classes - 1}")
        frame = pd.DataFrame({"path": [f"train/{c}/{i}" for i, c in zip(table.Id, table.Category, strict=True)],
                              "label": table.Category.to_numpy()})
        missing = [p for p in frame.path if not (root / p).is_file()]
        if missing:
            raise DataError(f"{csv_path} lists {len(missing)} image(s) that are not on disk, first: "
                            f"{root / missing[0]} (expected each row's file in train/<Category>/). {GET_DATA_HINT}")
    else:
        frame = pd.DataFrame([(f"train/{k}/{name}", k) for k, names in files.items() for name in names],
                             columns=["path", "label"])
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def _unique_ids(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Each Id once: a repeated row (same Id and Category) is dropped with a warning, since a photo listed twice
    could otherwise train and validate at once; an Id with two Categories is refused, since only the user knows
    which label is right."""
    categories = table.groupby("Id", sort=True).Category.unique()
    contradictions = categories[categories.map(len) > 1]
    if len(contradictions):
        named = ", ".join(f"{i} ({', '.join(map(str, sorted(c)))})" for i, c in contradictions.head(5).items())
        raise DataError(f"{path}: {len(contradictions)} Id(s) listed with more than one Category: {named}"
                        f"{', ...' if len(contradictions) > 5 else ''}; expected one Category per Id")
    repeated = table.Id.duplicated()
    if repeated.any():
        ids = sorted(set(table.Id[repeated]))
        warnings.warn(f"{path}: dropping {int(repeated.sum())} repeated row(s) (same Id and Category), each photo "
                      f"kept once; Id(s): {', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}", stacklevel=3)
    return table[~repeated].reset_index(drop=True)


def _read_id_table(path: Path) -> pd.DataFrame:
    """Read an ``Id,Category`` CSV (train.csv, sample-submission.csv), naming the file if it is malformed."""
    try:
        table = pd.read_csv(path)
    except Exception as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if list(table.columns[:2]) != ["Id", "Category"]:
        raise DataError(f"{path} has columns {list(table.columns)}; expected the header Id,Category")
    if not pd.api.types.is_integer_dtype(table.Category):
        raise DataError(f"{path}: column Category must hold integer class indices")
    table["Id"] = table.Id.astype(str)
    return table


def read_test(root: str | os.PathLike) -> pd.DataFrame:
    """Test images in the order of ``sample-submission.csv``: frame of ``Id`` and ``path`` (relative to root)."""
    root = Path(root)
    sample = root / "sample-submission.csv"
    if not sample.is_file():
        raise DataError(f"{sample} not found: it gives the Ids and order of the submission. {GET_DATA_HINT}")
    table = _read_id_table(sample)
    frame = pd.DataFrame({"Id": table.Id, "path": "test_upload/" + table.Id})
    missing = [p for p in frame.path if not (root / p).is_file()]
    if missing:
        raise DataError(f"{sample} lists {len(missing)} image(s) missing from {root / 'test_upload'}, "
                        f"first: {root / missing[0]}")
    return frame
