"""Perceptual hashes of images and near-duplicate pairs: the audit's core, and ``data.dedup``.

Two stages. A 64-bit perceptual hash (``imagehash.phash``: DCT of a 32x32 grey thumbnail, robust to resizing and
recompression) proposes candidate pairs at Hamming distance <= a threshold. The hash only sees the coarse layout,
so different photos with the same composition collide (carnet-demo's cars: 4-6 bits apart); a pixel check then
confirms each candidate: the correlation of small colour thumbnails, each channel normalised (brightness and
contrast shifts cancel), best over slight crops of either image. Training can drop training images that are
near-duplicates of validation images (``data.dedup=true``), so validation accuracy is not inflated by twins.
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

from carnet.data.dataset import default_num_workers
from carnet.data.decode import pil_to_rgb

DEFAULT_THRESHOLD = 12  # candidate bits of 64: resized/recompressed copies 0-4, copies cropped 3-5% per side
# mostly 8-16, unrelated photos ~32; the pixel check, not this threshold, tells copies from look-alikes
DEFAULT_SIMILARITY = 0.9  # pixel check: true copies score >= 0.93, distinct photos <= 0.8 (see docs/data.md)
_SIDE = 32  # thumbnail side of the pixel check
_GRID = 96  # crops are cut from a thumbnail of this side
_SCALES = (1.0, 0.95, 0.9, 0.85)  # crops tried per axis (fraction kept), each at the start, centre and end


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
            # As training sees it (EXIF orientation applied, 16-bit scaled): a rotated copy is still a copy.
            bits = imagehash.phash(Image.fromarray(pil_to_rgb(img))).hash.flatten()
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
    with ThreadPoolExecutor(max_workers=workers or default_num_workers()) as pool:
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


def _area_weights(start: float, stop: float, n_in: int = _GRID, n_out: int = _SIDE) -> np.ndarray:
    """(n_out, n_in) matrix averaging the span [start, stop) (fractions of the side) of n_in pixels into n_out."""
    edges = np.linspace(start * n_in, stop * n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


# Spans of one side: the whole side first, then _SCALES of it at the start, centre and end.
_SPANS = [(0.0, 1.0)] + [(o * (1 - s), o * (1 - s) + s) for s in _SCALES[1:] for o in (0.0, 0.5, 1.0)]
_WEIGHTS = np.stack([_area_weights(a, b) for a, b in _SPANS]).astype(np.float32)


def _views(path: str) -> np.ndarray:
    """Normalised thumbnails of the image and of its slight crops: (views, _SIDE * _SIDE * 3) unit vectors,
    the whole image first.

    Each colour channel has zero mean, so a brightness shift or a colour cast changes nothing; the norm is taken
    over all channels, so contrast does not either. Crops are area averages of one _GRID x _GRID thumbnail.
    """
    with Image.open(path) as img:
        img.draft("RGB", (_GRID * 2, _GRID * 2))  # JPEG: decode at a fraction of the size
        grid = np.asarray(img.convert("RGB").resize((_GRID, _GRID), Image.Resampling.BOX), dtype=np.float32)
    n, weights = len(_SPANS), _WEIGHTS.reshape(-1, _GRID)  # (spans * _SIDE, _GRID)
    rows = (weights @ grid.reshape(_GRID, -1)).reshape(n * _SIDE, _GRID, 3)  # each vertical span, all columns
    cols = weights @ rows.transpose(1, 0, 2).reshape(_GRID, -1)  # then each horizontal span
    views = cols.reshape(n, _SIDE, n, _SIDE, 3).transpose(2, 0, 3, 1, 4).reshape(n * n, _SIDE * _SIDE, 3)
    views -= views.mean(axis=1, keepdims=True)
    views = views.reshape(len(views), -1)
    return views / (np.linalg.norm(views, axis=1, keepdims=True) + 1e-6)


def pair_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two images' ``_views`` are: the best correlation of either whole image with a crop of the other
    (a copy cropped by a few percent matches the original's crop), 1 for identical pixels."""
    return float(max((b @ a[0]).max(), (a @ b[0]).max()))


def pixel_similarity(paths: Sequence[str | os.PathLike], i: np.ndarray, j: np.ndarray, paths_b:
                     Sequence[str | os.PathLike] | None = None, workers: int | None = None) -> np.ndarray:
    """``pair_similarity`` of each candidate pair (paths[i[k]], paths_b[j[k]]); NaN where a file cannot be read.

    Only the images in candidate pairs are decoded, once each (thumbnails are ~100 KB, so big candidate sets
    are done in batches of images).
    """
    paths_b = paths if paths_b is None else paths_b
    keys_a = [str(paths[k]) for k in i]
    keys_b = [str(paths_b[k]) for k in j]
    order = sorted(range(len(keys_a)), key=lambda k: (keys_a[k], keys_b[k]))
    sims = np.full(len(keys_a), np.nan)
    batch = 2000  # images per batch: ~200 MB of views
    with ThreadPoolExecutor(max_workers=workers or default_num_workers()) as pool:
        start = 0
        while start < len(order):
            wanted: dict[str, None] = {}
            stop = start
            while stop < len(order) and len(wanted) < batch:
                wanted.update(dict.fromkeys((keys_a[order[stop]], keys_b[order[stop]])))
                stop += 1

            def views_or_none(path: str) -> np.ndarray | None:
                try:
                    return _views(path)
                except Exception:  # unreadable here: hash_images already reported it
                    return None

            views = dict(zip(wanted, pool.map(views_or_none, wanted), strict=True))
            for k in order[start:stop]:
                va, vb = views[keys_a[k]], views[keys_b[k]]
                if va is not None and vb is not None:
                    sims[k] = pair_similarity(va, vb)
            start = stop
    return sims


def confirmed_pairs(paths: Sequence[str | os.PathLike], phash: np.ndarray, threshold: int = DEFAULT_THRESHOLD,
                    min_similarity: float = DEFAULT_SIMILARITY, paths_b: Sequence[str | os.PathLike] | None = None,
                    phash_b: np.ndarray | None = None, workers: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Near-duplicate pairs: phash candidates (``near_pairs``) that pass the pixel check.

    Returns (i, j, distance, similarity, number of candidates). ``min_similarity`` <= 0 skips the pixel check
    (hash only; similarity NaN).
    """
    i, j, d = near_pairs(phash, phash_b, threshold)
    if min_similarity <= 0 or not len(i):
        return i, j, d, np.full(len(i), np.nan), len(i)
    sims = pixel_similarity(paths, i, j, paths_b, workers)
    keep = sims >= min_similarity
    return i[keep], j[keep], d[keep], sims[keep], len(i)


def drop_val_near_duplicates(frame: pd.DataFrame, root: str | os.PathLike, threshold: int = DEFAULT_THRESHOLD,
                             workers: int | None = None, min_similarity: float = DEFAULT_SIMILARITY,
                             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Remove training rows that are (near-)duplicates of a validation row: phash within ``threshold`` bits and
    confirmed by the pixel check (``min_similarity``), so a different car with the same layout stays.

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
    files = hashes.path.to_numpy()
    i, j, *_ = confirmed_pairs(files[train_rows], phash[train_rows].astype(np.uint64), threshold, min_similarity,
                               files[val_rows], phash[val_rows].astype(np.uint64), workers)
    drop = pd.Series(frame.path.to_numpy()[val_rows[j]], index=train_rows[i]).groupby(level=0).first()
    dropped = frame.iloc[drop.index].assign(val_twin=drop.to_numpy())
    kept = frame.drop(index=frame.index[drop.index]).reset_index(drop=True)
    return kept, dropped.reset_index(drop=True)
