"""The LightningDataModule: the split, albumentations pipelines and loaders over a Kaggle-layout folder.

``data.decode`` picks where photos are decoded and augmented: in the loader workers (``cpu``), or on the training
device from file bytes (``gpu``, :mod:`carnet.data.device_pipeline`); ``auto`` is ``gpu`` for a run on CUDA.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from carnet.data.cache import ImageCache
from carnet.data.decode import decode_image, decode_min_side, find_undecodable
from carnet.data.dedup import drop_val_near_duplicates
from carnet.data.device_pipeline import EncodedDataset, collate_encoded, unsupported
from carnet.data.layout import DataError, read_test, scan_train
from carnet.data.sources import merge_sources, read_sources
from carnet.data.splits import assign_split
from carnet.data.transforms import build_eval_transform, build_train_transform

log = logging.getLogger(__name__)

# data.decode: cpu = workers decode and augment (the default); gpu = workers read bytes, the run's
# CUDA device decodes and augments; auto = gpu when the run is on CUDA; device = the byte path on whatever device
# the run uses, the CPU included (tests, and measuring the device pipeline without a GPU).
DECODE_MODES = ("cpu", "gpu", "auto", "device")


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

    Eval interpolation and crop come from ``data_config`` (timm's data config of the model); batches are uint8 pixels
    and the network normalises them on its device (:class:`carnet.models.network.Normalize`).
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
        dedup_threshold: int = 12,
        cache: str = "none",
        cache_dir: str | os.PathLike | None = None,
        decode: str = "cpu",
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
        # data.extra / k-fold / dedup (carnet.data.sources, carnet.data.splits, carnet.tools.audit)
        self.extra = [extra] if isinstance(extra, str) else list(extra or [])
        self.num_folds, self.fold = num_folds, fold
        self.dedup, self.dedup_threshold = dedup, int(dedup_threshold)
        self.source_stats: dict[str, Any] = {}
        self.dedup_dropped: pd.DataFrame | None = None
        self.cache = ImageCache(cache, cache_dir)  # data.cache=none|memory|disk, see carnet/cache.py
        if decode not in DECODE_MODES:
            raise DataError(f"data.decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
        self.decode = decode
        self._on_device: bool | None = None  # data.decode resolved, once the run's device is known

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

        competition = scan_train(self.root, self.num_classes)
        extra, stats = read_sources(self.extra, self.class_names)
        frame = merge_sources(competition, extra, self.root)  # each photo once, competition rows first
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
        split, fold = assign_split(frame.path[own], frame.label[own], self.seed, self.val_fraction, self.num_folds,
                                   self.fold)
        frame.loc[own, "split"], frame.loc[own, "fold"] = split, fold
        if self.dedup:
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
        """Write split.csv (``path,label,split,fold,source``) so later tools validate on exactly these images."""
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

    def decode_on_device(self) -> bool:
        """Whether loaders hand over encoded photos that the run's device decodes and augments (data.decode).

        Resolved once, when the first loader is built: Lightning has attached the trainer by then, and its device
        decides (``auto``/``gpu`` need CUDA there; with no trainer, ``auto`` is ``cpu``). ``gpu`` without CUDA says
        once that the CPU pipeline runs; ``gpu`` with an augmentation the device cannot do is an error, ``auto``
        then keeps the CPU pipeline and says why.
        """
        if self._on_device is None:
            self._on_device = self._resolve_decode()
        return self._on_device

    def _resolve_decode(self) -> bool:
        if self.decode == "cpu":
            return False
        if self.decode in ("gpu", "auto"):
            # The run's device; without a trainer (tools, benchmarks) auto keeps the CPU pipeline they expect.
            device = self.trainer.strategy.root_device if self.trainer is not None else None
            cuda = device.type == "cuda" if device is not None else self.decode == "gpu" and torch.cuda.is_available()
            if not cuda:
                if self.decode == "gpu":
                    log.warning("data.decode=gpu: this run has no CUDA device; photos are decoded and augmented "
                                "in the loader workers on the CPU (data.decode=cpu)")
                return False
        names = sorted({n for t in (self.train_transform(), self.eval_transform()) for n in unsupported(t)})
        why = (f"augment has {', '.join(names)}, which the device pipeline does not do (it does RandomResizedCrop, "
               "HorizontalFlip, RandomBrightnessContrast: augment=light or none)") if names else (
            f"data.cache={self.cache.mode} keeps decoded images") if self.cache.mode != "none" else None
        if why is None:
            log.info("data.decode=%s: loader workers read file bytes; photos are decoded and augmented on the run's "
                     "device", self.decode)
            return True
        if self.decode == "auto":
            log.info("data.decode=auto: decoding and augmenting on the CPU: %s", why)
            return False
        raise DataError(f"data.decode={self.decode}: {why}; use data.decode=cpu")

    def _dataset(self, paths: Sequence[str], labels: Sequence[int] | None,
                 transform: A.Compose) -> ImageDataset | EncodedDataset:
        """Decode at the reduced scale the transform allows; pre-fill a memory cache before workers fork.

        With data.decode on the device: a dataset of file bytes, whose views the same transform draws.
        """
        if self.decode_on_device():
            return EncodedDataset(self.root, paths, labels, transform)
        min_side = decode_min_side(transform)
        if self.cache.mode == "memory":
            self.cache.warm([self.root / p for p in paths], min_side, workers=max(2, self.num_workers))
        return ImageDataset(self.root, paths, labels, transform, min_side=min_side, cache=self.cache)

    def _loader(self, dataset: Dataset, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,  # no 1-image batch to upset BatchNorm
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # Training workers start afresh each epoch and take their augmentation seeds from torch's RNG then
            # (persistent workers would continue streams no checkpoint holds): a resumed run repeats the epochs
            # it continues (carnet.training.resume). Evaluation loaders draw nothing random and keep theirs.
            persistent_workers=self.num_workers > 0 and not shuffle,
            worker_init_fn=_seed_worker_augmentations,
            generator=generator,
            collate_fn=collate_encoded if isinstance(dataset, EncodedDataset) else None,
        )

    def train_dataloader(self) -> DataLoader:
        rows = self._rows("train")
        transform = self.train_transform()
        if self.trainer is not None:  # Lightning draws the first batch now: seed this epoch first (resume repeats it)
            from carnet.training.resume import seed_epoch

            seed_epoch(self.trainer, self.seed, transform)
        return self._loader(self._dataset(rows.path, rows.label, transform), shuffle=True)

    def feature_loader(self, augmented: bool, seed: int = 0, photos: Sequence[int] | None = None) -> DataLoader:
        """The training photos in order, for computing features once (carnet.training.head_fit): the eval view,
        or one training view of each drawn with ``seed`` (the same views on every run and DDP rank); ``photos``:
        only these rows of the training photos."""
        rows = self._rows("train")
        if photos is not None:
            rows = rows.iloc[list(photos)]
        transform = self.train_transform() if augmented else self.eval_transform()
        transform.set_random_seed(self.seed + seed)
        # Loader workers reseed their views from torch's worker seeds: a seeded generator fixes those too.
        return self._loader(self._dataset(rows.path, rows.label, transform), shuffle=False,
                            generator=torch.Generator().manual_seed(self.seed + seed))

    def val_dataloader(self, image_size: int | None = None) -> DataLoader:
        """The validation photos in the eval view; at another ``image_size`` for a phase that changes it."""
        rows = self._rows("val")
        transform = self.eval_transform() if image_size in (None, self.image_size) else build_eval_transform(
            image_size, self.mean, self.std, self.interpolation, self.crop_pct)
        return self._loader(self._dataset(rows.path, rows.label, transform), shuffle=False)

    def test_frame(self) -> pd.DataFrame:
        return read_test(self.root)

    def predict_dataloader(self) -> DataLoader:
        frame = self.test_frame()
        return self._loader(self._dataset(frame.path, None, self.eval_transform()), shuffle=False)
