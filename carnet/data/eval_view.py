"""The evaluation view of a photo: its shorter side resized to ``image_size / crop_pct``, then the centre
``image_size`` x ``image_size`` square. The one implementation every path runs: training's validation and
head-fit features and predict (wrapped as an albumentations step by :mod:`carnet.data.transforms`), the web
service with either backend, and the GPU pipeline's plan (:mod:`carnet.data.device_pipeline`, the same geometry).

NumPy and OpenCV only, so that the ONNX service runs it without torch, Hydra or albumentations (importing
albumentations imports torch). OpenCV is what albumentations resizes with: the view gives the pixels of the
albumentations ``SmallestMaxSize(area_for_downscale="image")`` + ``CenterCrop`` pipeline carnet validated with
before, bit for bit (tests/test_eval_view.py), so existing checkpoints see what they were selected on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2  # opencv-python-headless, installed with albumentations (a dependency of carnet)
import numpy as np

# timm names its resize interpolations like PIL; OpenCV wants its flags.
CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def cv2_interpolation(name: str) -> int:
    """OpenCV flag for a timm interpolation name ('bicubic', 'bilinear', ...)."""
    try:
        return CV2_INTERPOLATION[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(CV2_INTERPOLATION)}") from None


@dataclass(frozen=True)
class EvalView:
    """The eval view of a model: size, resize interpolation (a timm name) and crop fraction, from its checkpoint.

    Shrinking always uses OpenCV's INTER_AREA (a box filter: antialiased, as PIL resizes in timm's eval
    transform); enlarging uses ``interpolation``.
    """

    image_size: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        cv2_interpolation(self.interpolation)  # an unknown name fails here, not at the first image
        if self.image_size < 1 or self.crop_pct <= 0:
            raise ValueError(f"eval view image_size={self.image_size}, crop_pct={self.crop_pct}: expected a positive "
                             "size and fraction")

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> EvalView:
        """The view a checkpoint's (or an exported file's) inference metadata describes."""
        return cls(int(meta["image_size"]), str(meta.get("interpolation", "bicubic")),
                   float(meta.get("crop_pct", 1.0)))

    @property
    def resize_to(self) -> int:
        """The shorter side after the resize; also the smallest side a photo may be decoded at without losing
        anything the view uses (:func:`carnet.data.decode.decode_image`'s ``min_side``)."""
        return max(self.image_size, round(self.image_size / self.crop_pct))

    def resize(self, height: int, width: int) -> tuple[tuple[int, int], int]:
        """((height, width) after the resize, OpenCV flag) for an image of ``height`` x ``width``."""
        scale = self.resize_to / min(height, width)
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        return shape, cv2.INTER_AREA if scale < 1 else cv2_interpolation(self.interpolation)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the centre square in a resized image of ``height`` x ``width``."""
        size = self.image_size
        y0, x0 = (height - size) // 2, (width - size) // 2
        return x0, y0, x0 + size, y0 + size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The view of an RGB uint8 HxWx3 image: ``image_size`` x ``image_size`` x 3 uint8 (a view into the
        resized array, not a copy)."""
        height, width = image.shape[:2]
        shape, flag = self.resize(height, width)
        if shape != (height, width):
            image = cv2.resize(image, shape[::-1], interpolation=flag)  # OpenCV takes (width, height)
        x0, y0, x1, y1 = self.crop_box(*shape)
        return image[y0:y1, x0:x1]

    def batch(self, image: np.ndarray) -> np.ndarray:
        """The view of one image as the uint8 (1, 3, H, W) batch every carnet model (and ONNX file) takes."""
        return np.ascontiguousarray(self(image).transpose(2, 0, 1))[None]
