"""Test pictures: in-memory photos for upload and export tests, rendered cars on disk, the tiny data's JPEGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (120, 90), fmt: str = "JPEG") -> bytes:
    """A non-square test picture (smooth colours + a block) encoded in memory: varied enough to move the model."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def car_jpeg(path: Path, cls: int, key: int) -> Path:
    """A small JPEG of a car of class ``cls`` drawn by carnet-demo (``key`` picks the picture) at ``path``."""
    from carnet.tools.demo import render

    path.parent.mkdir(parents=True, exist_ok=True)
    render(cls, seed=7, key=key, size=(96, 72)).save(path, quality=90)
    return path


def train_jpegs(root: Path) -> list[Path]:
    """The training JPEGs of a data folder in the Kaggle layout (train/<class>/*.jpg), in a stable order."""
    return sorted((root / "train").rglob("*.jpg"))
