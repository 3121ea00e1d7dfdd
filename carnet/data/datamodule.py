"""The LightningDataModule: the split, albumentations pipelines and loaders over a Kaggle-layout folder.

``data.decode`` picks where photos are decoded and augmented: in the loader workers (``cpu``), or on the training
device from file bytes (``gpu``, :mod:`carnet.data.device_pipeline`); its ``auto`` is resolved before, with the
run's other ``auto`` values (:mod:`carnet.runtime`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from carnet.data.cache import ImageCache
from carnet.data.corrections import apply_corrections, read_corrections
from carnet.data.dataset import (
    ImageDataset,
    drops_last_batch,
    images_per_rank,
    seed_epoch,
    seed_worker_augmentations,
)
from carnet.data.decode import find_undecodable
from carnet.data.dedup import drop_val_near_duplicates
from carnet.data.device_pipeline import EncodedDataset, collate_encoded, why_not_on_device
from carnet.data.layout import read_test, scan_train
from carnet.data.sources import merge_sources, read_sources
from carnet.data.splits import assign_split
from carnet.data.transforms import build_eval_transform, build_train_transform, decode_min_side
from carnet.errors import DataError

log = logging.getLogger(__name__)

# data.decode as resolved (carnet.runtime): cpu = workers decode and augment; gpu and device = workers read bytes,
# the device a batch is moved to decodes and augments it (gpu: the run's CUDA device; device: whatever it is).
DECODE_PATHS = ("cpu", "gpu", "device")


class CarDataModule(pl.LightningDataModule):
    """Train/val/test loaders for a dataset in the Kaggle layout, with albumentations pipelines.

    Eval interpolation and crop come from ``data_config`` (timm's data config of the model); batches are uint8 pixels
    and the network normalises them on its device (:class:`carnet.models.network.Normalize`).

    Every argument is required: its default is in conf/ (conf/data, ``image_size``, ``seed``, ``augment``), stated
    there once, and ``num_workers``, ``decode`` and ``pin_memory`` come resolved (carnet.runtime). Code that builds
    one directly states its recipe, or builds it from conf/ (carnet.training.builders.build_datamodule).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_names: Sequence[str],
        *,
        image_size: int,
        val_fraction: float,
        batch_size: int,
        num_workers: int,
        strict: bool,
        verify: bool,
        seed: int,
        augment: Sequence[Any],
        data_config: dict[str, Any],
        extra: Sequence[str] | str | None,
        num_folds: int,
        fold: int | None,
        dedup: bool,
        dedup_threshold: int,
        cache: str,
        cache_dir: str | os.PathLike | None,
        decode: str,
        pin_memory: bool,
        corrections: str | os.PathLike | None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.strict = strict
        self.verify = verify
        self.seed = seed
        self.augment = list(augment)
        self.interpolation = data_config["interpolation"]
        self.crop_pct = float(data_config["crop_pct"])
        self.split: pd.DataFrame | None = None
        self.excluded: dict[str, str] = {}
        # data.extra / k-fold / dedup (carnet.data.sources, carnet.data.splits, carnet.tools.audit)
        self.extra = [extra] if isinstance(extra, str) else list(extra or [])
        self.num_folds, self.fold = num_folds, fold
        self.dedup, self.dedup_threshold = dedup, int(dedup_threshold)
        self.source_stats: dict[str, Any] = {}
        self.dedup_dropped: pd.DataFrame | None = None
        self.cache = ImageCache(cache, cache_dir)  # data.cache=none|memory|disk, see carnet/data/cache.py
        if decode not in DECODE_PATHS:
            raise DataError(f"data.decode={decode!r}: expected one of {', '.join(DECODE_PATHS)} (auto is resolved "
                            "before, by carnet.runtime.resolve_runtime)")
        self.decode = decode
        self.pin_memory = bool(pin_memory)
        self.seeded_epoch: int | None = None  # the training epoch whose draws are seeded (set_epoch)
        self._train_transform: A.Compose | None = None  # the pipeline of the latest training loader
        self._warmed = False  # data.cache=memory filled with the split (_warm_split)
        if self.on_device and (why := why_not_on_device([self.train_transform(), self.eval_transform()],
                                                        self.cache.mode)):
            raise DataError(f"data.decode={decode}: {why}; use data.decode=cpu")
        # data.corrections: a label_issues.csv of carnet-inspect with the user's keep/drop/relabel verdicts
        self.corrections = Path(corrections) if corrections else None
        self.correction_stats: dict[str, Any] | None = None

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
        if self.corrections is not None:  # after the split: no other photo changes side
            frame, self.correction_stats = apply_corrections(
                frame, read_corrections(self.corrections, self.class_names), self.corrections)
            log.info("data.corrections=%s: %d photo(s) dropped, %d relabelled", self.corrections,
                     self.correction_stats["dropped"], self.correction_stats["relabelled"])
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
        """Facts about the data for summary.json: extra sources (images used from each), fold, dedup, corrections."""
        return {"extra_sources": self.source_stats, "fold": self.fold,
                "num_folds": self.num_folds if self.fold is not None else None,
                "num_dedup_excluded": None if self.dedup_dropped is None else len(self.dedup_dropped),
                "corrections": self.correction_stats}

    def write_split(self, path: str | os.PathLike) -> None:
        """Write split.csv (``path,label,split,fold,source``) so later tools validate on exactly these images."""
        assert self.split is not None, "call setup() first"
        self.split.to_csv(path, index=False)

    def _rows(self, split: str) -> pd.DataFrame:
        assert self.split is not None, "call setup() first"
        return self.split[self.split.split == split]

    def train_transform(self) -> A.Compose:
        transform = build_train_transform(self.augment, self.image_size, self.interpolation, self.crop_pct)
        transform.set_random_seed(self.seed)  # num_workers=0: one reproducible stream in this process
        return transform

    def eval_transform(self) -> A.Compose:
        return build_eval_transform(self.image_size, self.interpolation, self.crop_pct)

    @property
    def on_device(self) -> bool:
        """Whether loaders hand over encoded photos that the device a batch moves to decodes and augments."""
        return self.decode != "cpu"

    def _dataset(self, paths: Sequence[str], labels: Sequence[int] | None,
                 transform: A.Compose) -> ImageDataset | EncodedDataset:
        """Decode at the reduced scale the transform allows; pre-fill a memory cache before workers fork.

        With data.decode on the device: a dataset of file bytes, whose views the same transform draws.
        """
        if self.on_device:
            return EncodedDataset(self.root, paths, labels, transform)
        min_side = decode_min_side(transform)
        if self.cache.mode == "memory":
            self._warm_split()
            self.cache.warm([(self.root / p, min_side) for p in paths], workers=max(2, self.num_workers))
        return ImageDataset(self.root, paths, labels, transform, min_side=min_side, cache=self.cache)

    def _warm_split(self) -> None:
        """Fill a memory cache with the whole split at once, training photos at the training view's size and
        validation photos at the evaluation view's, and say so in one line: Lightning builds the two loaders one
        after the other, and each would otherwise report its half."""
        if self._warmed:
            return
        self._warmed = True
        sides = {"train": decode_min_side(self.train_transform()), "val": decode_min_side(self.eval_transform())}
        items = [(self.root / p, sides[split]) for split in sides for p in self._rows(split).path]
        self.cache.warm(items, workers=max(2, self.num_workers))
        log.info("image cache: %d images, %.0f MB in memory", len(self.cache), self.cache.nbytes() / 2**20)

    def _loader(self, dataset: Dataset, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # Per DDP process: on its share, a last partial batch is the only one sooner (2 processes, 57 photos,
            # batch 32: 29 each, which drop_last made no batch at all, and the run "completed" without a step).
            drop_last=shuffle and drops_last_batch(images_per_rank(len(dataset), self._world_size()), self.batch_size),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Training workers start afresh each epoch and take their augmentation seeds from torch's RNG then
            # (persistent workers would continue streams no checkpoint holds): a resumed run repeats the epochs
            # it continues (set_epoch). Evaluation loaders draw nothing random and keep theirs.
            persistent_workers=self.num_workers > 0 and not shuffle,
            worker_init_fn=seed_worker_augmentations,
            generator=generator,
            collate_fn=collate_encoded if isinstance(dataset, EncodedDataset) else None,
        )

    def _world_size(self) -> int:
        """The processes the attached Trainer trains in (DDP), each loading its share; 1 without a Trainer."""
        return int(self.trainer.world_size) if self.trainer is not None else 1

    def set_epoch(self, epoch: int) -> None:
        """Seed what training epoch ``epoch`` draws (its shuffle, the loader workers' augmentation seeds, the views
        drawn in this process and the dropout masks) from (seed, epoch, rank) alone, as ``DistributedSampler``'s
        ``set_epoch`` seeds its shuffle: call it before the epoch's loader iterator is made. A run resumed from
        ``last.ckpt`` then draws what the stopped run drew in the epochs it continues
        (:class:`carnet.training.seeding.SeedEachEpoch` calls it at each epoch's start).
        """
        rank = self.trainer.global_rank if self.trainer is not None else 0
        seed_epoch(self.seed, epoch, rank, self._train_transform)
        self.seeded_epoch = epoch

    def train_dataloader(self) -> DataLoader:
        rows = self._rows("train")
        self._train_transform = transform = self.train_transform()
        if self.trainer is not None:  # Lightning makes this epoch's iterator right away, before the epoch starts
            self.set_epoch(self.trainer.current_epoch)
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
            image_size, self.interpolation, self.crop_pct)
        return self._loader(self._dataset(rows.path, rows.label, transform), shuffle=False)

    def test_frame(self) -> pd.DataFrame:
        return read_test(self.root)

    def predict_dataloader(self) -> DataLoader:
        return self.unlabelled_loader()

    def unlabelled_loader(self, photos: Sequence[int] | None = None) -> DataLoader:
        """The test photos (``test_frame``) in the eval view, in order; ``photos``: only these rows of them."""
        frame = self.test_frame()
        if photos is not None:
            frame = frame.iloc[list(photos)]
        return self._loader(self._dataset(frame.path, None, self.eval_transform()), shuffle=False)
