"""Reduced-scale JPEG decoding: what each pipeline allows, and that it costs (almost) no pixels."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from carnet.data.decode import decode_image
from carnet.data.transforms import build_eval_transform, build_train_transform, decode_min_side, eval_transforms
from tests.helpers.images import train_jpegs
from tests.helpers.recipe import data_module

LIGHT_224 = [{"_target_": "albumentations.RandomResizedCrop", "size": [224, 224], "scale": [0.5, 1.0],
              "ratio": [0.75, 1.3333]}, {"_target_": "albumentations.HorizontalFlip", "p": 0.5}]


@pytest.fixture(scope="module")
def photo(tiny_data: Path) -> Path:
    """A 640x480 JPEG from the synthetic dataset (drawn car, background clutter, sensor noise)."""
    path = train_jpegs(tiny_data)[0]
    assert Image.open(path).size == (640, 480)
    return path


def test_min_side_of_each_pipeline() -> None:
    eval_view = build_eval_transform(224, crop_pct=0.875)
    assert decode_min_side(eval_view) == 256  # the eval resize target: image_size / crop_pct
    train = build_train_transform(LIGHT_224, 224)
    assert decode_min_side(train) == math.ceil(224 / math.sqrt(0.5)) == 317  # smallest crop still >= 224 px
    no_augment = build_train_transform([], 224, crop_pct=0.942)
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
    transform = A.Compose(eval_transforms(224, "bicubic", crop_pct=0.942))
    min_side = decode_min_side(transform)
    reduced, full = decode_image(photo, min_side), decode_image(photo)
    assert reduced.shape[:2] == (240, 320) and full.shape[:2] == (480, 640)  # the draft path really ran
    a, b = transform(image=reduced)["image"], transform(image=full)["image"]
    assert a.shape == b.shape == (224, 224, 3)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() < 3.0, f"mean abs difference {diff.mean():.2f} of 255"  # DCT scaling ~ a box filter
    assert np.percentile(diff, 99) < 40
    # the same holds for the uint8 CHW tensor the loader hands over (the network normalises it)
    tensor = build_eval_transform(224, crop_pct=0.942)
    ta, tb = tensor(image=reduced)["image"], tensor(image=full)["image"]
    assert ta.shape == tb.shape == (3, 224, 224) and ta.dtype == tb.dtype == torch.uint8
    assert (ta.float() - tb.float()).abs().mean().item() < 3.0


def test_datamodule_decodes_at_what_each_loader_needs(tiny_data: Path) -> None:
    dm = data_module(tiny_data, [str(k) for k in range(10)], image_size=64, batch_size=4, num_workers=0,
                     verify=False, augment=[{**LIGHT_224[0], "size": [64, 64]}],
                     data_config={"interpolation": "bicubic", "crop_pct": 0.875})
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.dataset.min_side == math.ceil(64 / math.sqrt(0.5))
    assert val.dataset.min_side == round(64 / 0.875)
    images, labels = next(iter(val))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4,)


# ---- what is decoded: 16-bit samples and EXIF orientation, the same on every path ---------------------------


def grey16_png(path: Path) -> np.ndarray:
    """A 16-bit greyscale PNG: a full-range ramp over a mid-grey frame; returns the 16-bit samples."""
    samples = np.full((40, 300), 32896, np.uint16)  # 32896 = 128 * 257: mid-grey
    samples[10:30] = np.linspace(0, 65535, 300).round().astype(np.uint16)
    Image.fromarray(samples).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # PIL keeps the 16 bits (I;16)
    return samples


def rotated_jpeg(path: Path, size: tuple[int, int] = (640, 480), orientation: int = 6) -> np.ndarray:
    """A JPEG stored sideways with an EXIF Orientation tag; returns the picture as it should be shown (upright)."""
    w, h = size
    upright = np.zeros((w, h, 3), np.uint8)  # shown upright it is h wide and w tall (a portrait)
    upright[: w // 4] = (250, 30, 30)  # red band at the top
    upright[:, : h // 4, 2] = 220  # blue band on the left
    stored = np.rot90(upright, k=1)  # orientation 6 means: rotate the stored pixels 90 degrees clockwise to show
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif.tobytes())
    return upright


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    samples = grey16_png(tmp_path / "grey16.png")
    image = decode_image(tmp_path / "grey16.png")
    assert image.dtype == np.uint8 and image.shape == (40, 300, 3)
    expected = np.round(samples / 257).astype(np.uint8)
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)
    assert (image == 255).mean() < 0.01  # clipping made 99.6 % of it white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = rotated_jpeg(tmp_path / "rotated.jpg")
    image = decode_image(tmp_path / "rotated.jpg")
    assert image.shape == upright.shape == (640, 480, 3)
    assert np.abs(image.astype(int) - upright).mean() < 4


def test_exif_orientation_with_reduced_jpeg_decode(tmp_path: Path) -> None:
    """The draft path still runs (1/2 scale) and the result is still upright."""
    upright = rotated_jpeg(tmp_path / "rotated.jpg")
    image = decode_image(tmp_path / "rotated.jpg", min_side=200)
    assert image.shape == (320, 240, 3)
    assert image[:70, 100:, 0].mean() > 200 and image[:70, 100:, 2].mean() < 60  # red band on top
    assert image[200:, :50, 2].mean() > 180  # blue band on the left
    assert np.abs(image.astype(int) - upright[::2, ::2]).mean() < 8


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_holds_upright_scaled_images(tmp_path: Path, mode: str) -> None:
    from carnet.data.cache import ImageCache

    upright = rotated_jpeg(tmp_path / "rotated.jpg")
    samples = grey16_png(tmp_path / "grey16.png")
    cache = ImageCache(mode, tmp_path / "cache")
    for _ in range(2):  # a miss, then a hit
        assert cache.get(tmp_path / "rotated.jpg", 240).shape == (320, 240, 3)
        assert np.array_equal(cache.get(tmp_path / "grey16.png", None)[..., 1], np.round(samples / 257))
    assert cache.hits == 2 and cache.misses == 2
    assert upright.shape[0] > upright.shape[1]


def tricky_images(folder: Path) -> list[Path]:
    """Files whose pixels need more than a plain convert("RGB"): 16 bits, EXIF, palette, alpha, CMYK, greyscale."""
    rotated_jpeg(folder / "rotated.jpg", size=(64, 48), orientation=8)
    grey16_png(folder / "grey16.png")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(folder / "palette.png", transparency=3)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(rgb).save(folder / "rotated.png", exif=exif.tobytes())  # PNG eXIf chunk
    return sorted(folder.iterdir())


def test_upload_and_file_decoding_agree(tmp_path: Path) -> None:
    """The service decodes exactly what training and predict decode, pixel for pixel."""
    from carnet.serving.upload import decode_upload

    for path in tricky_images(tmp_path):
        from_file, from_upload = decode_image(path), decode_upload(path.read_bytes())
        assert from_file.dtype == np.uint8 and from_file.shape[2] == 3, path.name
        assert np.array_equal(from_file, from_upload), path.name
    assert decode_image(tmp_path / "rotated.png").shape == (30, 50, 3)
    assert np.array_equal(decode_image(tmp_path / "rotated.png"),
                          np.asarray(Image.open(tmp_path / "rotated.png").convert("RGB"))[::-1, ::-1])
