"""Perceptual hashes of images and near-duplicate pairs: the audit's core, and ``data.dedup``.

A 64-bit perceptual hash (``imagehash.phash``: DCT of a 32x32 grey thumbnail, robust to resizing and
recompression) finds near-duplicates at Hamming distance <= a threshold; training can drop training images that
are near-duplicates of validation images (``data.dedup=true``), so validation accuracy is not inflated by twins.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

DEFAULT_THRESHOLD = 6  # bits of 64; resized/recompressed copies measure 0-4, unrelated photos ~32


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _hash_one(path: str) -> dict[str, Any]:
    """SHA-1, perceptual hash and header facts of one file; ``error`` says why it could not be read."""
    info: dict[str, Any] = {"sha1": None, "phash": None, "width": None, "height": None, "format": None,
                            "mode": None, "error": None}
    try:
        data = Path(path).read_bytes()
        info["sha1"] = hashlib.sha1(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            info.update(width=img.width, height=img.height, format=img.format, mode=img.mode)
            img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; phash only looks at a 32x32 thumbnail
            bits = imagehash.phash(img.convert("RGB")).hash.flatten()
        info["phash"] = int(np.packbits(bits).view(">u8")[0])
    except Exception as err:  # PIL raises many types for bad files; all mean "unreadable"
        info["error"] = f"{type(err).__name__}: {err}"
    return info


def hash_images(paths: Sequence[str | os.PathLike], workers: int | None = None, progress: bool = True,
                description: str = "hashing images") -> pd.DataFrame:
    """One row per path: sha1, phash (uint64, NaN-free only where readable), width, height, format, mode, error.

    Threads: PIL and numpy release the GIL while decoding and transforming, so this scales with cores.
    """
    paths = [str(p) for p in paths]
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        jobs = pool.map(_hash_one, paths)
        if progress and paths:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, transient=True) as bar:
                task = bar.add_task(description, total=len(paths))
                for info in jobs:
                    results.append(info)
                    bar.advance(task)
        else:
            results = list(jobs)
    frame = pd.DataFrame(results, columns=["sha1", "phash", "width", "height", "format", "mode", "error"])
    frame.insert(0, "path", paths)
    return frame


def near_pairs(a: np.ndarray, b: np.ndarray | None = None, threshold: int = DEFAULT_THRESHOLD,
               budget: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i into a, j into b, Hamming distance) of 64-bit hashes at distance <= threshold.

    With ``b`` None, pairs within ``a`` with i < j. All pairs by blocks of ``budget`` XORs (popcount in numpy):
    exact and cheap up to ~10^5 images, no index structure to maintain.
    """
    a = np.asarray(a, dtype=np.uint64)
    same = b is None
    b = a if same else np.asarray(b, dtype=np.uint64)
    chunk = max(1, budget // max(1, len(b)))
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(a), chunk):
        dist = np.bitwise_count(a[start:start + chunk, None] ^ b[None, :])
        i, j = np.nonzero(dist <= threshold)
        d = dist[i, j]
        i = i + start
        if same:
            keep = j > i
            i, j, d = i[keep], j[keep], d[keep]
        found_i.append(i)
        found_j.append(j)
        found_d.append(d)
    if not found_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d).astype(int)


def nearest_distances(a: np.ndarray, budget: int = 1 << 22) -> np.ndarray:
    """Each hash's Hamming distance to its nearest other hash: the gap between twins (0-4) and merely similar
    photos shows whether ``threshold`` sits in a valley of this data."""
    a = np.asarray(a, dtype=np.uint64)
    chunk = max(1, budget // max(1, len(a)))
    nearest = np.full(len(a), 64, dtype=int)
    for start in range(0, len(a), chunk):
        dist = np.bitwise_count(a[start:start + chunk, None] ^ a[None, :]).astype(int)
        rows = np.arange(dist.shape[0])
        dist[rows, rows + start] = 65  # not itself
        nearest[start:start + chunk] = np.minimum(dist.min(axis=1), 64)
    return nearest


def drop_val_near_duplicates(frame: pd.DataFrame, root: str | os.PathLike, threshold: int = DEFAULT_THRESHOLD,
                             workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Remove training rows that are (near-)duplicates of a validation row.

    ``frame`` has ``path`` (relative to root or absolute) and ``split``. Returns (kept frame, dropped rows with the
    ``val_twin`` each one matched). Unreadable images get no hash and are never dropped here.
    """
    root = Path(root)
    hashes = hash_images([root / p for p in frame.path], workers, description="dedup: hashing images")
    ok = hashes.phash.notna().to_numpy()
    is_val = (frame.split == "val").to_numpy()
    val_rows = np.flatnonzero(is_val & ok)
    train_rows = np.flatnonzero(~is_val & ok)
    phash = hashes.phash.to_numpy()
    i, j, _ = near_pairs(phash[train_rows].astype(np.uint64), phash[val_rows].astype(np.uint64), threshold)
    drop = pd.Series(frame.path.to_numpy()[val_rows[j]], index=train_rows[i]).groupby(level=0).first()
    dropped = frame.iloc[drop.index].assign(val_twin=drop.to_numpy())
    kept = frame.drop(index=frame.index[drop.index]).reset_index(drop=True)
    return kept, dropped.reset_index(drop=True)
