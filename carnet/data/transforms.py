"""albumentations pipelines: training views from the `augment` config, evaluation view from the model.

Every pipeline ends in a uint8 CHW tensor: no float conversion or normalisation on the CPU (a 448 px float32
image is 2.4 MB, uint8 0.6 MB, and loader workers pass batches through shared memory). The network normalises
on its own device with the model's mean and std (:class:`carnet.models.network.Normalize`). The evaluation resize
interpolation comes from the model's timm data config, so a checkpoint of any timm model is fed exactly what its
pretrained weights expect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate

# timm names its resize interpolations like PIL; albumentations wants OpenCV flags.
_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def cv2_interpolation(name: str) -> int:
    """OpenCV flag for a timm interpolation name ('bicubic', 'bilinear', ...)."""
    try:
        return _CV2_INTERPOLATION[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_CV2_INTERPOLATION)}") from None


def eval_transforms(image_size: int, interpolation: str = "bicubic", crop_pct: float = 1.0) -> list[A.BasicTransform]:
    """Resize the shorter side to image_size / crop_pct, then centre-crop image_size x image_size."""
    resize_to = max(image_size, round(image_size / crop_pct))
    return [
        A.SmallestMaxSize(max_size=resize_to, interpolation=cv2_interpolation(interpolation),
                          area_for_downscale="image"),  # antialiased shrinking, like PIL in timm
        A.CenterCrop(height=image_size, width=image_size),
    ]


def to_tensor() -> list[A.BasicTransform]:
    """HWC uint8 pixels to a CHW uint8 tensor (a view, no copy): the network normalises on its device."""
    return [ToTensorV2()]


def build_train_transform(augment: Sequence[Any] | None, image_size: int, interpolation: str = "bicubic",
                          crop_pct: float = 1.0) -> A.Compose:
    """Training pipeline: the `augment.train` list (albumentations transforms, or their `_target_` configs).

    An empty list means no augmentation: the training images get the evaluation view. A final resize to
    image_size x image_size (a no-op after a crop of that size) gives every batch one shape.
    """
    steps = [instantiate(t, _convert_="all") if isinstance(t, Mapping) else t for t in augment or []]
    if not steps:
        steps = eval_transforms(image_size, interpolation, crop_pct)
    return A.Compose([*steps, A.Resize(image_size, image_size), *to_tensor()])


def build_eval_transform(image_size: int, interpolation: str = "bicubic", crop_pct: float = 1.0) -> A.Compose:
    """Evaluation pipeline: deterministic resize + centre crop, to a uint8 CHW tensor."""
    return A.Compose([*eval_transforms(image_size, interpolation, crop_pct), *to_tensor()])
