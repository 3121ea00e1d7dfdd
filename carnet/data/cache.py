"""A cache of decoded, resized training images (``data.cache=none|memory|disk``).

JPEG decoding is most of a data loader's CPU time. When a dataset is small enough (or the same images feed a
long 448 px phase), decoding each file once and keeping the result, already shrunk to the smallest size the
pipeline needs (``min_side``, see :func:`carnet.data.transforms.decode_min_side`), lets every later epoch skip it.

Entries are keyed by the file's path, its size in bytes, its modification time (ns) and ``min_side`` (so each
image size gets its own entries): an edited or replaced file misses and is decoded again; a disk entry of the
old file is deleted when the new one is written.

- ``memory``: a dict in this process. :meth:`ImageCache.warm` fills it with threads *before* the DataLoader forks
  its workers, which then share the pages copy-on-write (Linux ``fork``) instead of each decoding its own copy.
  Needs roughly ``N x min_side^2 x 4/3 x 3`` bytes: ~6 GB for the 15,561 competition images at 224 px training.
- ``disk``: one ``.npy`` file per image under ``cache_dir/s<min_side>/``, written atomically (temp + rename), so
  any number of worker processes and later runs share it; loading is a plain read, no decoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from carnet.artifacts import atomic_path
from carnet.data.decode import DECODE_VERSION, decode_image
from carnet.errors import CacheError

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns): changes whenever the file is rewritten or replaced."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def decode_resized(path: str | os.PathLike, min_side: int | None) -> np.ndarray:
    """Decode (at reduced JPEG scale when allowed) and shrink so the shorter side is ``min_side``, never less.

    Shrinking with INTER_AREA (a proper box filter) to exactly what the pipeline needs keeps cache entries small
    and makes every later augmentation cheaper, without losing any detail the pipeline would use.
    """

    image = decode_image(path, min_side)
    shorter = min(image.shape[:2])
    if min_side and shorter > min_side:
        scale = min_side / shorter
        h, w = image.shape[:2]
        size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))  # cv2 wants (width, height)
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


class ImageCache:
    """Decoded, resized images by (path, size, mtime, min_side); counts hits and misses of this process."""

    def __init__(self, mode: str = "none", cache_dir: str | os.PathLike | None = None) -> None:
        mode = str(mode).lower()
        if mode not in CACHE_MODES:
            raise CacheError(f"data.cache={mode!r}: expected one of {', '.join(CACHE_MODES)}")
        if mode == "disk" and not cache_dir:
            raise CacheError("data.cache=disk needs data.cache_dir=PATH (a folder for the decoded images)")
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hits = 0
        self.misses = 0
        self._memory: dict[tuple[str, int | None], tuple[tuple[int, int], np.ndarray]] = {}

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def __len__(self) -> int:
        """Entries held: in memory, or ``.npy`` files on disk."""
        if self.mode == "disk":
            return sum(1 for _ in self.cache_dir.glob("s*/*.npy")) if self.cache_dir.is_dir() else 0
        return len(self._memory)

    def nbytes(self) -> int:
        """Bytes of pixel data held in memory (0 for the other modes)."""
        return sum(image.nbytes for _, image in self._memory.values())

    def _disk_path(self, path: str, min_side: int | None, stamp: tuple[int, int]) -> tuple[Path, str]:
        key = hashlib.sha1(path.encode()).hexdigest()[:20]
        folder = self.cache_dir / f"s{min_side or 'full'}-d{DECODE_VERSION}"  # a new decoder: new entries
        return folder / f"{key}-{stamp[0]}-{stamp[1]}.npy", key

    def get(self, path: str | os.PathLike, min_side: int | None) -> np.ndarray:
        """The image of ``path`` as ``decode_resized`` gives it: from the cache when the file is unchanged."""
        if self.mode == "none":
            return decode_resized(path, min_side)
        path = os.path.abspath(path)
        stamp = file_stamp(path)
        if self.mode == "memory":
            entry = self._memory.get((path, min_side))
            if entry is not None and entry[0] == stamp:
                self.hits += 1
                return entry[1]
            self.misses += 1
            image = decode_resized(path, min_side)
            image.setflags(write=False)  # shared by every epoch (and forked worker): transforms must copy
            self._memory[(path, min_side)] = (stamp, image)
            return image
        target, key = self._disk_path(path, min_side, stamp)
        try:
            image = np.load(target)
            self.hits += 1
            return image
        except (FileNotFoundError, ValueError, OSError):
            pass  # not cached yet, or a truncated file from a killed run: decode and (re)write it
        self.misses += 1
        image = decode_resized(path, min_side)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{key}-*.npy"):  # entries of older versions of this file
            if stale != target:
                stale.unlink(missing_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.save(f, image)
        return image

    def warm(self, items: Sequence[tuple[str | os.PathLike, int | None]], workers: int = 4,
             description: str = "caching images") -> int:
        """Fill the cache for ``(path, min_side)`` items with threads (PIL and OpenCV release the GIL); return how
        many were decoded (the rest were there already). A progress bar on a terminal only: a log gets no bar.

        Meant for ``memory`` mode, in the parent process before the loader starts its workers; for ``disk`` it
        just front-loads the first epoch's decoding. The caller says what it filled (one line for a whole split).
        """
        if not self.enabled or not items:
            return 0
        import contextlib
        import sys

        from rich.progress import Progress

        misses = self.misses
        # No Progress at all without a terminal: rich before 14.3 prints an empty line when a disabled one stops.
        bar = Progress(transient=True) if sys.stdout.isatty() else None
        with bar or contextlib.nullcontext(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            task = bar.add_task(f"{description} (data.cache={self.mode})", total=len(items)) if bar else None
            for _ in pool.map(lambda item: self.get(*item), items):
                if bar is not None:
                    bar.advance(task)
        return self.misses - misses
