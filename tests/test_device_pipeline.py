"""data.decode=gpu: workers read bytes, the device decodes and augments. The same code runs here on the CPU and is
compared with the albumentations pipeline: the same random draws, the same distributions, the same pixels within
the difference of two resize kernels."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from carnet.data.dataset import ImageDataset
from carnet.data.device_pipeline import (
    EncodedBatch,
    EncodedDataset,
    EncodedImage,
    collate_encoded,
    decode_batch,
    plan_view,
    unsupported,
)
from carnet.data.transforms import build_eval_transform, build_train_transform, decode_min_side
from carnet.errors import DataError
from carnet.runtime import resolve_runtime
from carnet.training.builders import build_datamodule, build_module
from tests.helpers.config import compose_cfg
from tests.helpers.images import train_jpegs
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.paths import CONF
from tests.helpers.recipe import data_module

NAMES = [str(k) for k in range(10)]


def augment(name: str, size: int) -> list[dict]:
    """conf/augment/<name>.yaml's training list at ``size`` px (what Hydra resolves ${image_size} to)."""
    steps = OmegaConf.to_container(OmegaConf.load(CONF / "augment" / f"{name}.yaml"))["train"]
    for step in steps:
        if "size" in step:
            step["size"] = [size, size]
    return steps


def light(size: int = 64, seed: int = 0):
    transform = build_train_transform(augment("light", size), size)
    transform.set_random_seed(seed)
    return transform


# Where EncodedBatch.to decodes and augments: the CPU everywhere, and CUDA (nvJPEG) where there is a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_batch(dataset: EncodedDataset, indices: range, device: str = "cpu") -> torch.Tensor:
    batch, _ = collate_encoded([dataset[i] for i in indices])
    out = batch.to(device)
    assert out.device.type == device
    return out.cpu()


def cpu_batch(dataset: ImageDataset, indices: range) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])


def save(path: Path, pixels: np.ndarray, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path.name


def test_views_are_the_albumentations_transforms_own_draws() -> None:
    """Seeded alike, the device plan of each image is the CPU pipeline's: crop box, flip, contrast and brightness."""
    cpu, device = light(seed=11), light(seed=11)
    crop, flip, colour = cpu.transforms[:3]
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
        cpu(image=np.zeros((*shape, 3), np.uint8))
        geometry, flipped, alpha, beta = plan_view(device, shape)
        assert geometry[0] == ("crop", crop.params["crop_coords"])
        assert flipped == bool(flip.params)  # a transform's params are empty when it was not applied
        assert (alpha, beta) == (colour.params.get("alpha", 1.0), colour.params.get("beta", 0.0))


@pytest.mark.parametrize("area_for_downscale", [None, "image"])
def test_crop_resize_kernel_is_the_one_albumentations_applies(area_for_downscale: str | None) -> None:
    """The device plan's kernel for each training crop's resize is the one albumentations used (INTER_AREA when it
    shrinks with area_for_downscale, else the transform's interpolation), read off the CPU pipeline's pixels."""

    def pipeline() -> A.Compose:
        crop = A.RandomResizedCrop(size=(64, 64), scale=(0.08, 1.0), interpolation=cv2.INTER_LINEAR,
                                   area_for_downscale=area_for_downscale, p=1.0)
        compose = A.Compose([crop])
        compose.set_random_seed(5)
        return compose

    cpu, device = pipeline(), pipeline()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        image = rng.integers(0, 256, (int(rng.integers(40, 200)), int(rng.integers(40, 200)), 3), dtype=np.uint8)
        out = cpu(image=image)["image"]
        x0, y0, x1, y1 = cpu.transforms[0].params["crop_coords"]
        used = {flag for flag in (cv2.INTER_AREA, cv2.INTER_LINEAR)
                if np.array_equal(cv2.resize(image[y0:y1, x0:x1], (64, 64), interpolation=flag), out)}
        (crop, resize), _, _, _ = plan_view(device, image.shape[:2])
        assert crop[1] == (x0, y0, x1, y1) and len(used) >= 1
        if len(used) == 1:  # a crop of exactly 64x64 is the same with both kernels
            assert resize[2] in used
            seen |= used
    assert seen == ({cv2.INTER_AREA, cv2.INTER_LINEAR} if area_for_downscale else {cv2.INTER_LINEAR})


def test_device_views_have_the_cpu_pipelines_distributions(tmp_path: Path) -> None:
    """Independent seeds, many draws: crop area and aspect ratio (KS tests), flips and brightness measured on the
    output pixels of a JPEG decoded by each path."""
    n, shape = 600, (480, 640)
    cpu, device = light(seed=1), light(seed=2)
    boxes_cpu, frame = [], np.zeros((*shape, 3), np.uint8)
    for _ in range(n):
        cpu(image=frame)
        boxes_cpu.append(cpu.transforms[0].params["crop_coords"])
    boxes_dev = [plan_view(device, shape)[0][0][1] for _ in range(n)]

    def area_and_ratio(boxes: list) -> tuple[np.ndarray, np.ndarray]:
        b = np.array(boxes, float)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return w * h / (shape[0] * shape[1]), np.log(w / h)

    (area_c, ratio_c), (area_d, ratio_d) = area_and_ratio(boxes_cpu), area_and_ratio(boxes_dev)
    assert stats.ks_2samp(area_c, area_d).pvalue > 1e-3 and stats.ks_2samp(ratio_c, ratio_d).pvalue > 1e-3
    assert area_d.min() >= 0.49 and area_d.max() <= 1.0 and np.abs(ratio_d).max() <= np.log(4 / 3) + 0.01

    # Left half dark, right half bright: a crop always spans the middle column (its width is >= 0.53 of the frame),
    # so its first column is dark unless it was flipped. A flat grey image shows brightness/contrast alone.
    halves = np.full((120, 160, 3), 40, np.uint8)
    halves[:, 80:] = 210
    names = [save(tmp_path / "halves.jpg", halves, quality=95), save(tmp_path / "grey.jpg",
                                                                      np.full((120, 160, 3), 128, np.uint8))]
    m = 600
    paths = [names[0]] * m + [names[1]] * m
    out_cpu = cpu_batch(ImageDataset(tmp_path, paths, None, cpu, decode_min_side(cpu)), range(2 * m)).float()
    out_dev = device_batch(EncodedDataset(tmp_path, paths, None, device), range(2 * m)).float()
    assert out_dev.shape == out_cpu.shape == (2 * m, 3, 64, 64)
    flips_cpu = (out_cpu[:m, :, :, 0].mean((1, 2)) > out_cpu[:m, :, :, -1].mean((1, 2))).float().mean()
    flips_dev = (out_dev[:m, :, :, 0].mean((1, 2)) > out_dev[:m, :, :, -1].mean((1, 2))).float().mean()
    assert abs(flips_dev - 0.5) < 0.08 and abs(flips_cpu - 0.5) < 0.08  # 4 binomial standard errors (0.02)
    # Brightness/contrast on grey 128: shift = 128 (alpha - 1) + beta, half the time; std ~17.5 levels. The spread
    # is what a wrong factor would change (half the brightness range: std ~11), the mean stays ~0 either way.
    shift_cpu, shift_dev = out_cpu[m:].mean((1, 2, 3)) - 128, out_dev[m:].mean((1, 2, 3)) - 128
    assert stats.ks_2samp(shift_cpu.numpy(), shift_dev.numpy()).pvalue > 1e-3
    assert abs(shift_dev.std() / shift_cpu.std() - 1) < 0.1 and abs(shift_dev.mean() - shift_cpu.mean()) < 2.5
    changed = (shift_dev.abs() > 0.5).float().mean()  # p=0.5 of a change, almost never a null one
    assert abs(changed - 0.5) < 0.08 and shift_dev.abs().max() <= 0.15 * 128 + 0.15 * 255 + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["eval", "train"])
def test_views_match_albumentations_pixels(tiny_data: Path, view: str, device: str) -> None:
    """The eval view (decoded at reduced scale on the CPU, as the datamodule does) and, seeded alike, the training
    view: the same pixels up to the resize kernels. OpenCV's INTER_AREA (a box filter, albumentations' choice when
    shrinking) against torchvision's antialiased bilinear/bicubic differs on sharp edges, by a pixel level on
    average: tolerance 3 levels mean per image, 99% of values within 20."""
    root, paths = tiny_data, [str(p.relative_to(tiny_data)) for p in train_jpegs(tiny_data)[:12]]
    make = (lambda: build_eval_transform(64, "bicubic", crop_pct=0.875)) if view == "eval" else light
    cpu_t, dev_t = make(), make()
    # Training crops are drawn on the decoded size: the CPU side decodes at full size here to draw the same boxes.
    min_side = decode_min_side(cpu_t) if view == "eval" else None
    cpu = cpu_batch(ImageDataset(root, paths, None, cpu_t, min_side), range(12)).float()
    dev = device_batch(EncodedDataset(root, paths, None, dev_t), range(12), device)
    assert dev.dtype == torch.uint8 and dev.shape == (12, 3, 64, 64) and dev.is_contiguous()
    diff = (cpu - dev.float()).abs()
    assert diff.mean((1, 2, 3)).max() < 3.0, diff.mean((1, 2, 3))
    assert torch.quantile(diff.flatten(), 0.99) <= 20


@pytest.mark.parametrize("device", DEVICES)
def test_rotated_jpegs_and_16bit_pngs_decode_as_on_the_cpu(tmp_path: Path, device: str) -> None:
    """Every EXIF orientation (1-8: mirrored, rotated, transposed; applied after decoding by orient(), on the CPU
    and after nvJPEG alike; the header's size is swapped for the crop plan) and a 16-bit greyscale PNG (decoded in
    the worker by carnet.data.decode: scaled, not clipped to white). The JPEGs keep full-resolution chroma (4:4:4):
    nvJPEG upsamples 4:2:0 chroma otherwise than libjpeg, by 3.3 levels on average on these sharp colour blocks (an
    H200), a difference of the decoders that would hide what this test is about."""
    rng = np.random.default_rng(0)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8), 10, 0), 10, 1)  # 90x120 blocks
    names = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation  # 5-8: stored landscape, shown portrait
        names.append(save(tmp_path / f"orientation{orientation}.jpg", pixels, quality=95, subsampling=0, exif=exif))
    grey16 = (np.linspace(0, 65535, 90 * 120).reshape(90, 120)).astype(np.uint16)
    names.append(save(tmp_path / "grey16.png", grey16))
    cpu_t = build_eval_transform(48, "bilinear")
    dev_set = EncodedDataset(tmp_path, names, None, build_eval_transform(48, "bilinear"))
    assert dev_set[5][0].plan[0][0][1] == (64, 48)  # orientation 6, (h, w): a portrait shown 90 wide, 120 high
    assert dev_set[8][0].shape == (90, 120)  # the PNG travels as decoded pixels
    cpu = cpu_batch(ImageDataset(tmp_path, names, None, cpu_t), range(9)).float()
    dev = device_batch(dev_set, range(9), device).float()
    assert (cpu - dev).abs().mean((1, 2, 3)).max() < 3.0, (cpu - dev).abs().mean((1, 2, 3))
    assert len({tuple(img.flatten()[:64].tolist()) for img in cpu[:8]}) == 8  # eight different views
    assert dev[8].max() > 200  # 16-bit white stays white (clipping would make most of it 255, scaling a ramp)
    assert (dev[8] == 255).float().mean() < 0.05


def test_encoded_batches_travel_through_loader_workers_reproducibly(tiny_data: Path) -> None:
    """feature_loader with 2 workers: EncodedBatch pickles through the worker queues; seeded views repeat."""
    dm = data_module(tiny_data, NAMES, image_size=64, batch_size=8, num_workers=2, verify=False,
                     augment=augment("light", 64), decode="device")
    dm.setup()

    def first(seed: int) -> torch.Tensor:
        images, labels = next(iter(dm.feature_loader(augmented=True, seed=seed)))
        assert isinstance(images, EncodedBatch) and len(images) == len(labels) == 8
        return images.to("cpu")

    a, b, c = first(1), first(1), first(2)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmentations_without_a_device_version_are_named(tiny_data: Path) -> None:
    heavy = build_train_transform(augment("heavy", 64), 64)
    assert unsupported(heavy) == ["Affine", "ColorJitter", "ToGray", "OneOf", "CoarseDropout"]
    assert unsupported(light()) == [] and unsupported(build_eval_transform(64)) == []
    with pytest.raises(DataError, match=r"data\.decode=device: augment has .*Affine.*; use data\.decode=cpu"):
        data_module(tiny_data, NAMES, image_size=64, num_workers=0, verify=False, augment=augment("heavy", 64),
                    decode="device")
    with pytest.raises(DataError, match=r"data\.decode='auto': expected one of cpu, gpu, device \(auto is resolved"):
        data_module(tiny_data, NAMES, decode="auto")  # carnet.runtime resolves it first (tests/test_runtime.py)


class Batches(pl.Callback):
    """What Lightning's loops hand to training_step and validation_step, after their move to the device."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["train"].append(batch[0])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["val"].append(batch[0])


@pytest.mark.parametrize(("decode", "accelerator"), [("device", "cpu"), ("gpu", "cpu"),
                                                      pytest.param("gpu", "gpu", marks=pytest.mark.gpu)])
def test_lightning_fit_with_decode(tiny_data: Path, decode: str, accelerator: str,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """A Lightning fit (sanity check, a training step, validation): decode=device sends encoded batches through the
    loops, moved and decoded by EncodedBatch.to, so training_step and validation_step get uint8 pixels; decode=gpu
    does the same on a CUDA run (nvJPEG), and on a CPU run says so once and trains on the CPU pipeline."""
    trainer = "trainer=gpu" if accelerator == "gpu" else "trainer=cpu"  # the run's device decides where decoding is
    cfg = compose_cfg([*(trainer if o == "trainer=cpu" else o for o in ONE_BATCH), f"data.root={tiny_data}",
                       f"data.decode={decode}"])
    with caplog.at_level(logging.INFO, logger="carnet.runtime"):
        runtime = resolve_runtime(cfg)
        module, spy = build_module(cfg, runtime), Batches()
        datamodule = build_datamodule(cfg, module, runtime)
        trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=1,
                             limit_val_batches=1, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
        trainer.fit(module, datamodule=datamodule)
    assert len(spy.seen["train"]) == 1 and len(spy.seen["val"]) == 2  # sanity check + the epoch's validation
    on_device = decode == "device" or accelerator == "gpu"
    for images in spy.seen["train"] + spy.seen["val"]:
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        assert images.device.type == ("cuda" if accelerator == "gpu" else "cpu")
    assert isinstance(trainer.train_dataloader.dataset, EncodedDataset if on_device else ImageDataset)
    lines = [r.getMessage() for r in caplog.records if "data.decode" in r.getMessage()]
    expected = "decoded and augmented on the run's device" if on_device else "this run has no CUDA device"
    assert len(lines) == 1 and expected in lines[0]


@pytest.mark.slow
def test_train_py_with_decode_gpu_without_cuda(train_run, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py end to end: decode=gpu on a machine without CUDA trains, and says once why on the CPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child process sees no CUDA device, on any machine
    run_dir, proc = train_run(*ONE_BATCH, "data.decode=gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("data.decode=gpu: this run has no CUDA device") == 1
    assert (run_dir / "summary.json").exists()


def test_stream_of_bytes_is_one_block_per_batch() -> None:
    """collate_encoded joins the images' bytes (one shared-memory block per batch from a worker) and splits back."""
    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    plan = ((), False, 1.0, 0.0)
    items = [(EncodedImage(torch.frombuffer(bytearray(jpeg(k)), dtype=torch.uint8), None, plan), k) for k in range(3)]
    batch, labels = collate_encoded(items)
    assert batch.data.ndim == 1 and batch.data.numel() == sum(len(jpeg(k)) for k in range(3))
    assert labels.tolist() == [0, 1, 2]
    images = decode_batch(batch, torch.device("cpu"))
    assert [tuple(i.shape) for i in images] == [(3, 30, 40)] * 3
