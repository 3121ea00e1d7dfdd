"""Reduced-scale JPEG decoding: what each pipeline allows, and that it costs (almost) no pixels."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from carnet.data.datamodule import CarDataModule
from carnet.data.decode import decode_image, decode_min_side
from carnet.data.transforms import build_eval_transform, build_train_transform, eval_transforms
from tests.helpers.images import train_jpegs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIGHT_224 = [{"_target_": "albumentations.RandomResizedCrop", "size": [224, 224], "scale": [0.5, 1.0],
              "ratio": [0.75, 1.3333]}, {"_target_": "albumentations.HorizontalFlip", "p": 0.5}]


@pytest.fixture(scope="module")
def photo(tiny_data: Path) -> Path:
    """A 640x480 JPEG from the synthetic dataset (drawn car, background clutter, sensor noise)."""
    path = train_jpegs(tiny_data)[0]
    assert Image.open(path).size == (640, 480)
    return path


def test_min_side_of_each_pipeline() -> None:
    eval_view = build_eval_transform(224, MEAN, STD, crop_pct=0.875)
    assert decode_min_side(eval_view) == 256  # the eval resize target: image_size / crop_pct
    train = build_train_transform(LIGHT_224, 224, MEAN, STD)
    assert decode_min_side(train) == math.ceil(224 / math.sqrt(0.5)) == 317  # smallest crop still >= 224 px
    no_augment = build_train_transform([], 224, MEAN, STD, crop_pct=0.942)
    assert decode_min_side(no_augment) == round(224 / 0.942)
    unknown = A.Compose([A.Affine(scale=2.0), A.Resize(224, 224)])
    assert decode_min_side(unknown) is None  # unknown needs: decode at full size


@pytest.mark.parametrize("min_side", [60, 120, 200, 240, 317, 480, 600])
def test_reduced_decode_never_goes_below_min_side(photo: Path, min_side: int) -> None:
    image = decode_image(photo, min_side)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= min(min_side, 480)
    assert image.shape[1] / image.shape[0] == pytest.approx(640 / 480, rel=0.01)


def test_reduced_decode_matches_full_decode_after_the_same_resize(photo: Path) -> None:
    """B6's eval view at 224 px needs a 238 px shorter side: 640x480 decodes at 1/2 scale (320x240)."""
    transform = A.Compose(eval_transforms(224, MEAN, STD, "bicubic", crop_pct=0.942))
    min_side = decode_min_side(transform)
    reduced, full = decode_image(photo, min_side), decode_image(photo)
    assert reduced.shape[:2] == (240, 320) and full.shape[:2] == (480, 640)  # the draft path really ran
    a, b = transform(image=reduced)["image"], transform(image=full)["image"]
    assert a.shape == b.shape == (224, 224, 3)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() < 3.0, f"mean abs difference {diff.mean():.2f} of 255"  # DCT scaling ~ a box filter
    assert np.percentile(diff, 99) < 40
    # the same holds through normalisation into the tensor the model sees
    tensor = build_eval_transform(224, MEAN, STD, crop_pct=0.942)
    ta, tb = tensor(image=reduced)["image"], tensor(image=full)["image"]
    assert ta.shape == tb.shape == (3, 224, 224)
    assert (ta - tb).abs().mean().item() < 0.06  # ~3/255 in units of the channel std


def test_datamodule_decodes_at_what_each_loader_needs(tiny_data: Path) -> None:
    dm = CarDataModule(tiny_data, [str(k) for k in range(10)], image_size=64, batch_size=4, num_workers=0,
                       verify=False, augment=[{**LIGHT_224[0], "size": [64, 64]}],
                       data_config={"crop_pct": 0.875})
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.dataset.min_side == math.ceil(64 / math.sqrt(0.5))
    assert val.dataset.min_side == round(64 / 0.875)
    images, labels = next(iter(val))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4,)
