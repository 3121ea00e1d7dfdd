"""The Kaggle car dataset on disk: scanning and checking the layout, the stratified split, the DataModule.

Layout (sf-dl-car-classification): ``root/train/<k>/*.jpg`` with k the class index, ``root/train.csv``
(``Id,Category``, optional), ``root/test_upload/*.jpg`` and ``root/sample-submission.csv`` (``Id,Category``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from carnet.cache import ImageCache
from carnet.transforms import build_eval_transform, build_train_transform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
GET_DATA_HINT = (
    "Get the real data with `make data` (Kaggle competition sf-dl-car-classification, unzipped to data/), "
    "or write a synthetic dataset in the same layout with `python -m carnet.demo DIR`, then pass data.root=DIR."
)


class DataError(ValueError):
    """The dataset on disk is not in the layout or state carnet expects; the message says what and where."""


def decode_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 HxWx3 array.

    With ``min_side``, JPEGs are decoded at a reduced DCT scale (PIL ``draft``) as long as the shorter side stays
    at least ``min_side``: 2-4x less decoding work for a 640x480 photo fed to a 224 px model.
    """
    with Image.open(path) as img:
        if min_side and img.format == "JPEG":
            w, h = img.size
            scale = min_side / min(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # RGB JPEGs: no extra copy


def decode_min_side(transform: A.Compose) -> int | None:
    """The smallest shorter side an image may be decoded at without costing ``transform`` any detail.

    - Evaluation view (``SmallestMaxSize`` first): its ``max_size`` (image_size / crop_pct); anything larger is
      thrown away by the resize.
    - ``RandomResizedCrop(size S, scale (s_min, _), ratio (3/4, 4/3))`` first: ``ceil(S / sqrt(s_min))``. The
      smallest crop covers s_min of the frame; on a 4:3 frame with shorter side m (area 4/3 m^2) its shorter side
      is at least m * sqrt(s_min) for every ratio in [3/4, 4/3] (exactly that at 3:4 and 4:3, a square crop's is
      sqrt(4/3) times more), so m >= S / sqrt(s_min) means no crop is ever upsampled. At 224 px with light's
      s_min = 0.5 that is 317 px (heavy's 0.35: 379 px); at 448 px, 634 px: a 640x480 photo is then decoded at
      full size, but larger photos and the eval view at reduced scale (B6's 238 px eval side: 1/2 of 640x480).
    - Anything else first: None (full decoding), since we cannot tell what the pipeline needs.
    """
    first = transform.transforms[0] if len(transform.transforms) else None
    if isinstance(first, A.SmallestMaxSize) and first.max_size is not None:
        size = first.max_size
        return int(max(size) if isinstance(size, Sequence) else size)
    if isinstance(first, A.RandomResizedCrop):
        return math.ceil(max(first.size) / math.sqrt(min(first.scale)))
    return None


def _undecodable(path: Path) -> str | None:
    """None if the image decodes (at 1/8 scale: every byte is still read), else why not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.load()
        return None
    except Exception as err:  # PIL raises many types for bad files; any of them means "left out"
        return f"{type(err).__name__}: {err}"


def find_undecodable(paths: Sequence[Path], workers: int = 8) -> dict[Path, str]:
    """Decode every image once (threads: PIL releases the GIL while decoding); return the broken ones."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_undecodable, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


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
        table = _read_id_table(csv_path)
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


class ImageDataset(Dataset):
    """(image tensor, label) pairs from files; label -1 for unlabelled (test) images.

    Images are decoded at reduced JPEG scale down to ``min_side`` (see :func:`decode_min_side`); with a ``cache``
    they come decoded and shrunk to ``min_side`` from it instead.
    """

    def __init__(self, root: Path, paths: Sequence[str], labels: Sequence[int] | None, transform: A.Compose,
                 min_side: int | None = None, cache: ImageCache | None = None) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.min_side = min_side
        self.cache = cache if cache is not None and cache.enabled else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """The decoded uint8 HxWx3 image of row ``index``, before the transform."""
        path = self.root / self.paths[index]
        return decode_image(path, self.min_side) if self.cache is None else self.cache.get(path, self.min_side)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.load(index))["image"], self.labels[index]


def _seed_worker_augmentations(worker_id: int) -> None:
    """Give each loader worker its own albumentations stream, derived from torch's per-worker seed.

    albumentations 2 keeps its own RNG inside Compose (global seeds do not reach it), and forked workers would
    otherwise all replay the parent's stream. torch's worker seed is fixed by `seed_everything`, so runs repeat.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, A.Compose):
        transform.set_random_seed(info.seed % 2**32)


def default_num_workers() -> int:
    """A loader worker per CPU core this process may use (cgroup/affinity aware), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


class CarDataModule(pl.LightningDataModule):
    """Train/val/test loaders for a dataset in the Kaggle layout, with albumentations pipelines.

    Normalisation and eval interpolation come from ``data_config`` (timm's data config of the model).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_names: Sequence[str],
        image_size: int = 224,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        strict: bool = False,
        verify: bool = True,
        seed: int = 42,
        augment: Sequence[Any] | None = None,
        data_config: dict[str, Any] | None = None,
        extra: Sequence[str] | None = None,
        num_folds: int = 5,
        fold: int | None = None,
        dedup: bool = False,
        dedup_threshold: int = 6,
        cache: str = "none",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers in ("auto", None) else int(num_workers)
        self.strict = strict
        self.verify = verify
        self.seed = seed
        self.augment = list(augment or [])
        cfg = data_config or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.crop_pct = float(cfg.get("crop_pct", 1.0))
        self.split: pd.DataFrame | None = None
        self.excluded: dict[str, str] = {}
        # data.extra / k-fold / dedup (carnet.sources, carnet.folds, carnet.audit)
        self.extra = [extra] if isinstance(extra, str) else list(extra or [])
        self.num_folds, self.fold = num_folds, fold
        self.dedup, self.dedup_threshold = dedup, int(dedup_threshold)
        self.source_stats: dict[str, Any] = {}
        self.dedup_dropped: pd.DataFrame | None = None
        self.cache = ImageCache(cache, cache_dir)  # data.cache=none|memory|disk, see carnet/cache.py

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        """Scan and check the layout (+ ``data.extra`` sources), drop undecodable files, split train/val (once).

        Extra images are training-only; the split (fold or val_fraction) is drawn on the competition images alone,
        so adding a source never changes which images validate.
        """
        if self.split is not None:
            return
        from carnet.folds import assign_split
        from carnet.sources import read_sources

        frame = scan_train(self.root, self.num_classes).assign(source="train")
        extra, stats = read_sources(self.extra, self.class_names)
        frame = pd.concat([frame, extra], ignore_index=True)
        if self.verify:
            broken = find_undecodable([self.root / p for p in frame.path], workers=max(2, self.num_workers))
            if broken:
                listing = "\n".join(f"  {p}: {why}" for p, why in broken.items())
                if self.strict:
                    raise DataError(f"{len(broken)} image(s) cannot be decoded (data.strict=true):\n{listing}")
                warnings.warn(f"leaving out {len(broken)} image(s) that cannot be decoded:\n{listing}",
                              stacklevel=2)
                self.excluded = {str(p): why for p, why in broken.items()}
                keep = ~frame.path.map(lambda p: str(self.root / p) in self.excluded)
                frame = frame[keep].reset_index(drop=True)
        own = (frame.source == "train").to_numpy()
        frame["split"], frame["fold"] = "train", -1
        split, fold = assign_split(frame.label[own], self.seed, self.val_fraction, self.num_folds, self.fold)
        frame.loc[own, "split"], frame.loc[own, "fold"] = split, fold
        if self.dedup:
            from carnet.audit import drop_val_near_duplicates

            frame, self.dedup_dropped = drop_val_near_duplicates(frame, self.root, self.dedup_threshold,
                                                                 max(2, self.num_workers))
            log.info("data.dedup: left out %d training image(s) that are near-duplicates of validation images",
                     len(self.dedup_dropped))
        used = frame[frame.source != "train"].source.value_counts()
        self.source_stats = {name: {**s.as_dict(), "used": int(used.get(name, 0))} for name, s in stats.items()}
        columns = {"path": str, "label": int, "split": str, "fold": int, "source": str}  # as split.csv reads back
        self.split = frame[list(columns)].astype(columns).reset_index(drop=True)

    def data_summary(self) -> dict[str, Any]:
        """Facts about the data for summary.json: extra sources (images used from each), fold, dedup."""
        return {"extra_sources": self.source_stats, "fold": self.fold,
                "num_folds": self.num_folds if self.fold is not None else None,
                "num_dedup_excluded": None if self.dedup_dropped is None else len(self.dedup_dropped)}

    def write_split(self, path: str | os.PathLike) -> None:
        """Write the split (``path,label,split``) so later tools validate on exactly these images."""
        assert self.split is not None, "call setup() first"
        self.split.to_csv(path, index=False)

    def _rows(self, split: str) -> pd.DataFrame:
        assert self.split is not None, "call setup() first"
        return self.split[self.split.split == split]

    def train_transform(self) -> A.Compose:
        transform = build_train_transform(self.augment, self.image_size, self.mean, self.std,
                                          self.interpolation, self.crop_pct)
        transform.set_random_seed(self.seed)  # num_workers=0: one reproducible stream in this process
        return transform

    def eval_transform(self) -> A.Compose:
        return build_eval_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def _dataset(self, paths: Sequence[str], labels: Sequence[int] | None, transform: A.Compose) -> ImageDataset:
        """Decode at the reduced scale the transform allows; pre-fill a memory cache before workers fork."""
        min_side = decode_min_side(transform)
        if self.cache.mode == "memory":
            self.cache.warm([self.root / p for p in paths], min_side, workers=max(2, self.num_workers))
        return ImageDataset(self.root, paths, labels, transform, min_side=min_side, cache=self.cache)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,  # no 1-image batch to upset BatchNorm
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_seed_worker_augmentations,
        )

    def train_dataloader(self) -> DataLoader:
        rows = self._rows("train")
        return self._loader(self._dataset(rows.path, rows.label, self.train_transform()), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        rows = self._rows("val")
        return self._loader(self._dataset(rows.path, rows.label, self.eval_transform()), shuffle=False)

    def test_frame(self) -> pd.DataFrame:
        return read_test(self.root)

    def predict_dataloader(self) -> DataLoader:
        frame = self.test_frame()
        return self._loader(self._dataset(frame.path, None, self.eval_transform()), shuffle=False)
