"""Photos as a torch ``Dataset``, and the rules of the loaders over it, without Lightning: predict, the benchmarks
and the tools load images through this module; :class:`carnet.data.datamodule.CarDataModule` builds its
training and evaluation loaders from it.

- :class:`ImageDataset`: (image tensor, label) pairs from files.
- Training loaders drop their last partial batch (:func:`drops_last_batch`), and :func:`train_batches` counts the
  batches they give, so that a step budget counts the same batches (:mod:`carnet.training.budget`).
- Every epoch is seeded from (seed, epoch, rank) alone (:func:`seed_epoch`), as ``DistributedSampler.set_epoch``
  seeds its shuffle: a resumed run draws the shuffles, augmentations and dropout masks of the epochs it continues.
- :func:`default_num_workers`: the loader (and thread pool) size for ``num_workers=auto``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset

from carnet.data.cache import ImageCache
from carnet.data.decode import decode_image


class ImageDataset(Dataset):
    """(image tensor, label) pairs from files; label -1 for unlabelled (test) images.

    Images are decoded at reduced JPEG scale down to ``min_side`` (see :func:`carnet.data.transforms.decode_min_side`);
    with a ``cache`` they come decoded and shrunk to ``min_side`` from it instead.
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


def seed_worker_augmentations(worker_id: int) -> None:
    """Give each loader worker its own albumentations stream, derived from torch's per-worker seed.

    albumentations 2 keeps its own RNG inside Compose (global seeds do not reach it), and forked workers would
    otherwise all replay the parent's stream. torch's worker seed comes from torch's generator, which
    :func:`seed_epoch` seeds, so runs repeat.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, A.Compose):
        transform.set_random_seed(info.seed % 2**32)


def drops_last_batch(num_images: int, batch_size: int) -> bool:
    """Whether a training loader drops its last partial batch: yes (no 1-image batch to upset BatchNorm), unless
    that batch is the only one."""
    return num_images > batch_size


def images_per_rank(num_images: int, world_size: int) -> int:
    """One DDP process's share of ``num_images`` an epoch: Lightning's DistributedSampler pads the images to a
    multiple of the processes and hands each the same number."""
    return math.ceil(num_images / max(1, world_size))


def train_batches(num_images: int, batch_size: int) -> int:
    """Batches in one training epoch over ``num_images``: torch's own count for the loader's rule."""
    return len(BatchSampler(range(num_images), batch_size, drop_last=drops_last_batch(num_images, batch_size)))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: a function of these alone, so a resumed epoch draws what it drew before."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int = 0, transform: A.BaseCompose | None = None) -> None:
    """Seed Python, NumPy, torch (CUDA too) and the training pipeline's albumentations generator for one epoch.

    Called before the epoch's loader iterator is made: the iterator draws the shuffle and the loader workers' seeds
    from torch's generator, the training step draws dropout masks from it, and with ``num_workers=0`` the
    transform draws each view in this process.
    """
    value = epoch_seed(seed, epoch, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    if transform is not None:
        transform.set_random_seed(value)


def default_num_workers() -> int:
    """A loader worker (or decoding thread) per CPU core this process may use (cgroup/affinity aware), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))
