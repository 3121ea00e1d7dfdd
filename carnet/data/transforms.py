"""albumentations pipelines: training views from the `augment` config, evaluation view from the model.

Every pipeline ends in a uint8 CHW tensor: no float conversion or normalisation on the CPU (a 448 px float32
image is 2.4 MB, uint8 0.6 MB, and loader workers pass batches through shared memory). The network normalises
on its own device with the model's mean and std (:class:`carnet.models.network.Normalize`). The evaluation resize
interpolation comes from the model's timm data config, so a checkpoint of any timm model is fed exactly what its
pretrained weights expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate

from carnet.data.eval_view import EvalView


class EvalViewStep(A.ImageOnlyTransform):
    """:class:`carnet.data.eval_view.EvalView` as a step of an albumentations pipeline (deterministic).

    A step of our own rather than albumentations' ``SmallestMaxSize`` + ``CenterCrop`` (which it equals pixel for
    pixel): the web service runs the same view without albumentations, which imports torch, and training,
    predict and the service then share one implementation that cannot drift.
    """

    def __init__(self, view: EvalView) -> None:
        super().__init__(p=1.0)
        self.view = view

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return self.view(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("view",)


def eval_transforms(image_size: int, interpolation: str = "bicubic", crop_pct: float = 1.0) -> list[A.BasicTransform]:
    """Resize the shorter side to image_size / crop_pct, then centre-crop image_size x image_size
    (:class:`EvalView`)."""
    return [EvalViewStep(EvalView(image_size, interpolation, crop_pct))]


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


def decode_min_side(transform: A.Compose) -> int | None:
    """The smallest shorter side an image may be decoded at without costing ``transform`` any detail
    (:func:`carnet.data.decode.decode_image`'s ``min_side``).

    - Evaluation view first (:class:`EvalViewStep`, or albumentations' ``SmallestMaxSize``): its resize target,
      image_size / crop_pct; anything larger is thrown away by the resize.
    - ``RandomResizedCrop(size S, scale (s_min, _), ratio (3/4, 4/3))`` first: ``ceil(S / sqrt(s_min))``. The
      smallest crop covers s_min of the frame; on a 4:3 frame with shorter side m (area 4/3 m^2) its shorter side
      is at least m * sqrt(s_min) for every ratio in [3/4, 4/3] (exactly that at 3:4 and 4:3, a square crop's is
      sqrt(4/3) times more), so m >= S / sqrt(s_min) means no crop is ever upsampled. At 224 px with light's
      s_min = 0.5 that is 317 px (heavy's 0.35: 379 px); at 448 px, 634 px: a 640x480 photo is then decoded at
      full size, but larger photos and the eval view at reduced scale (B6's 238 px eval side: 1/2 of 640x480).
    - Anything else first: None (full decoding), since we cannot tell what the pipeline needs.
    """
    first = transform.transforms[0] if len(transform.transforms) else None
    if isinstance(first, EvalViewStep):
        return first.view.resize_to
    if isinstance(first, A.SmallestMaxSize) and first.max_size is not None:
        size = first.max_size
        return int(max(size) if isinstance(size, Sequence) else size)
    if isinstance(first, A.RandomResizedCrop):
        return math.ceil(max(first.size) / math.sqrt(min(first.scale)))
    return None
