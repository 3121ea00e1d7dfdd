"""The evaluation view (carnet.data.eval_view): albumentations' pixels without albumentations, one implementation
for training's validation, predict and the service."""

from __future__ import annotations

import io

import albumentations as A
import numpy as np
import pytest
import torch

from carnet.data.decode import decode_image
from carnet.data.eval_view import EvalView, cv2_interpolation
from carnet.data.transforms import build_eval_transform, decode_min_side
from carnet.tools.demo import render

# The views of real models: B6 (bicubic, crop 0.942), EfficientNet/ConvNeXt defaults (0.875), the demo model's 64 px
# (bilinear, no crop margin).
VIEWS = [EvalView(224, "bicubic", 0.942), EvalView(224, "bicubic", 0.875), EvalView(64, "bilinear", 1.0)]


def albumentations_view(view: EvalView) -> A.Compose:
    """The eval view as carnet built it before it had its own: albumentations' resize of the shorter side
    (INTER_AREA when shrinking) and centre crop. Checkpoints trained until then were validated with this."""
    return A.Compose([
        A.SmallestMaxSize(max_size=view.resize_to, interpolation=cv2_interpolation(view.interpolation),
                          area_for_downscale="image"),
        A.CenterCrop(height=view.image_size, width=view.image_size),
    ])


def car_photo(width: int, height: int, key: int) -> bytes:
    """A drawn car on a cluttered, noisy background (carnet-demo), as a JPEG of width x height."""
    buf = io.BytesIO()
    render(key % 10, seed=3, key=key, size=(width, height)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Landscape and portrait phone photos, a 36 MP-like large one, a thumbnail that must be enlarged, a tall and a wide
# strip, and a photo whose shorter side already is the resize target of the 0.875 view (256 px: no resize).
SIZES = [(640, 480), (480, 640), (1600, 1200), (100, 75), (300, 1000), (2000, 300), (341, 256)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_the_eval_view_gives_albumentations_pixels(width: int, height: int) -> None:
    """Bit for bit, at full decode and at the reduced JPEG scale every path decodes at (min_side = resize_to)."""
    data = car_photo(width, height, key=width + height)
    for view in VIEWS:
        for image in (decode_image(data), decode_image(data, view.resize_to)):
            ours, theirs = view(image), albumentations_view(view)(image=image)["image"]
            assert ours.shape == (view.image_size, view.image_size, 3) and ours.dtype == np.uint8
            assert np.array_equal(ours, theirs), (view, image.shape, np.abs(ours.astype(int) - theirs).max())


def test_training_predict_and_the_service_run_the_same_view() -> None:
    """build_eval_transform (the validation loaders', predict's) is the view as one albumentations step: the same
    uint8 CHW tensor as the service's batch, and the same decode scale."""
    image = decode_image(car_photo(640, 480, key=1))
    for view in VIEWS:
        transform = build_eval_transform(view.image_size, view.interpolation, view.crop_pct)
        tensor = transform(image=image)["image"]
        assert tensor.dtype == torch.uint8 and torch.equal(tensor[None], torch.from_numpy(view.batch(image)))
        assert decode_min_side(transform) == view.resize_to
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        EvalView(224, "cubic")
