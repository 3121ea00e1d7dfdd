"""Decoding and augmentation on the training device (``data.decode=gpu``): loader workers only read file bytes.

Why: at 448 px a B6 step on an H100 outruns what CPU workers can decode and augment. Here the work is split so
that the GPU does the pixel work and the workers do almost nothing:

- **In the worker** (:class:`EncodedDataset`): the file's bytes, the image size from its header (EXIF orientation
  applied) and the view's random parameters, drawn by the albumentations transforms of the CPU pipeline
  themselves (:func:`plan_view`: the same objects, the same random stream, seeded the same way), so both paths
  draw the same distributions (crop area and aspect ratio, flip, brightness/contrast) and a run's views are
  reproducible from its seed. Files that are not JPEG are decoded there (:func:`carnet.data.decode.decode_image`:
  EXIF orientation, 16-bit scaling) and travel as pixels.
- **On the device** (:meth:`EncodedBatch.to`): batched nvJPEG decoding (``torchvision.io.decode_jpeg``), EXIF
  orientation applied by :func:`orient` (torchvision applies it on the CPU only), then each image's crop/resize
  (torchvision v2 functional, antialiased like the CPU pipeline's ``area_for_downscale``), then flips and
  brightness/contrast for the whole batch at once.

The batch is a uint8 NCHW tensor at ``image_size``, unnormalised, exactly what the CPU loaders hand over: the
model normalises it itself. Whatever moves a batch to its device gets pixels: Lightning's loops (a ``.to``
method is all Lightning needs), and plain loops that call ``images.to(device)``. The same code runs on the CPU
(``device="cpu"``), which is how the tests compare it with the albumentations pipeline.

Only the transforms of ``augment=light`` and ``augment=none`` (and the evaluation view) are translated
(:data:`SUPPORTED`); :func:`unsupported` names any others so that the caller can keep the CPU pipeline.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from albumentations.augmentations.crops import functional as fcrops
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from carnet.data.decode import decode_image, pil_to_rgb
from carnet.data.transforms import EvalViewStep

# data.decode: cpu = workers decode and augment (the default); gpu = workers read bytes, the run's
# CUDA device decodes and augments; auto = gpu when the run is on CUDA; device = the byte path on whatever device
# the run uses, the CPU included (tests, and measuring the device pipeline without a GPU).
DECODE_MODES = ("cpu", "gpu", "auto", "device")


JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112  # values 5-8 store the picture transposed: its shown width is the stored height
CROPS = (A.RandomResizedCrop, A.CenterCrop, EvalViewStep)  # EvalViewStep: resize, then crop
GEOMETRY = (*CROPS, A.SmallestMaxSize, A.Resize)
PIXEL = (A.HorizontalFlip, A.RandomBrightnessContrast)
# Applied by the CPU pipeline only: the device batch stays uint8, and the model normalises it.
SKIPPED = (A.Normalize, ToTensorV2)
SUPPORTED = GEOMETRY + PIXEL + SKIPPED

# OpenCV flags (albumentations) to torchvision modes. Shrinking is antialiased on the device (torchvision's
# antialias=True), which is what INTER_AREA does on the CPU; LANCZOS4 has no torchvision kernel: bicubic is nearest.
_MODES = {
    cv2.INTER_NEAREST: InterpolationMode.NEAREST,
    cv2.INTER_NEAREST_EXACT: InterpolationMode.NEAREST_EXACT,
    cv2.INTER_LINEAR: InterpolationMode.BILINEAR,
    cv2.INTER_LINEAR_EXACT: InterpolationMode.BILINEAR,
    cv2.INTER_AREA: InterpolationMode.BILINEAR,
    cv2.INTER_CUBIC: InterpolationMode.BICUBIC,
    cv2.INTER_LANCZOS4: InterpolationMode.BICUBIC,
}

# One image's view: geometry steps in order, ("resize", (h, w), cv2 flag) or ("crop", (x0, y0, x1, y1)), then the
# pixel steps (flip, contrast alpha, brightness beta in pixel levels) that the device applies to the whole batch.
Plan = tuple[tuple[tuple[Any, ...], ...], bool, float, float]


def unsupported(transform: A.BaseCompose) -> list[str]:
    """Names of the transforms in ``transform`` that the device pipeline cannot do the same way (empty: it can).

    Besides unknown types: a crop after a flip or colour change (the device applies those to the finished crops;
    a resize commutes with them, a crop does not), and RandomBrightnessContrast relative to the image mean
    (``brightness_by_max=false``).
    """
    names, pixel_seen = [], False
    for t in transform.transforms:
        name = type(t).__name__
        if not isinstance(t, SUPPORTED) or (isinstance(t, CROPS) and pixel_seen) or (
                isinstance(t, A.RandomBrightnessContrast) and not t.brightness_by_max):
            names.append(name)
        pixel_seen = pixel_seen or isinstance(t, PIXEL)
    return names


def why_not_on_device(transforms: Sequence[A.BaseCompose], cache: str) -> str | None:
    """Why the device pipeline cannot draw the views of ``transforms`` (None: it can): a transform it does not do,
    or ``data.cache``, which keeps decoded images. The one rule for ``data.decode`` (carnet.runtime picks the path
    with it, the datamodule refuses a byte path that breaks it)."""
    names = sorted({name for transform in transforms for name in unsupported(transform)})
    if names:
        return (f"augment has {', '.join(names)}, which the device pipeline does not do (it does RandomResizedCrop, "
                "HorizontalFlip, RandomBrightnessContrast: augment=light or none)")
    if cache != "none":
        return f"data.cache={cache} keeps decoded images"
    return None


def _shape_params(t: A.BasicTransform, shape: tuple[int, int]) -> dict[str, Any]:
    """The transform's random parameters for an image of ``shape``, drawn as its ``__call__`` draws them.

    The image itself is a zero-byte stand-in of that shape: none of the supported transforms looks at pixels.
    """
    data = {"image": np.broadcast_to(np.zeros((), np.uint8), (*shape, 3))}
    params = t.update_transform_params(params=t.get_params(), data=data)
    params.update(t.get_params_dependent_on_data(params=params, data=data))
    return params


def plan_view(transform: A.BaseCompose, shape: tuple[int, int]) -> Plan:
    """Draw one view of an image of ``shape`` (height, width, after EXIF orientation) with the transforms of
    ``transform``, in their order and from their random stream, exactly as ``transform(image=...)`` would."""
    geometry: list[tuple[Any, ...]] = []
    flip, alpha, beta = False, 1.0, 0.0
    h, w = shape
    for t in transform.transforms:
        if isinstance(t, SKIPPED) or not t.should_apply():
            continue
        params = _shape_params(t, (h, w))
        if isinstance(t, A.RandomResizedCrop):
            x0, y0, x1, y1 = params["crop_coords"]
            geometry.append(("crop", (x0, y0, x1, y1)))
            # albumentations' rule for the image (RandomResizedCrop._get_interpolation_for_resize, private)
            shrink = (y1 - y0 > t.size[0] or x1 - x0 > t.size[1]) and t.area_for_downscale in ("image", "image_mask")
            geometry.append(("resize", tuple(t.size), cv2.INTER_AREA if shrink else t.interpolation))
            h, w = t.size
        elif isinstance(t, EvalViewStep):  # the CPU view's own geometry, so both paths crop the same box
            (nh, nw), flag = t.view.resize(h, w)
            geometry.append(("resize", (nh, nw), flag))
            h, w = nh, nw
            geometry.append(("crop", t.view.crop_box(h, w)))
            h = w = t.view.image_size
        elif isinstance(t, A.SmallestMaxSize):
            nh, nw = max(1, round(h * params["scale"])), max(1, round(w * params["scale"]))
            shrink = params["scale"] < 1.0 and t.area_for_downscale in ("image", "image_mask")
            geometry.append(("resize", (nh, nw), cv2.INTER_AREA if shrink else t.interpolation))
            h, w = nh, nw
        elif isinstance(t, A.CenterCrop):
            if t.height > h or t.width > w:
                raise ValueError(f"CenterCrop {t.height}x{t.width} is larger than the {h}x{w} image")
            geometry.append(("crop", fcrops.get_center_crop_coords((h, w), (t.height, t.width))))
            h, w = t.height, t.width
        elif isinstance(t, A.Resize):
            if (h, w) != (t.height, t.width):
                shrink = t.height < h or t.width < w
                geometry.append(("resize", (t.height, t.width),
                                 cv2.INTER_AREA if shrink and t.area_for_downscale else t.interpolation))
                h, w = t.height, t.width
        elif isinstance(t, A.HorizontalFlip):
            flip = not flip
        elif isinstance(t, A.RandomBrightnessContrast):
            alpha, beta = alpha * params["alpha"], beta * params["alpha"] + params["beta"]
        else:
            raise ValueError(f"{type(t).__name__} has no device implementation (see unsupported())")
    return tuple(geometry), flip, alpha, beta


def image_header(data: bytes) -> tuple[tuple[int, int], int]:
    """(height, width) of an encoded image as shown (EXIF orientation applied), and that orientation (1-8)."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
    return ((w, h) if orientation in (5, 6, 7, 8) else (h, w)), orientation


# EXIF orientation -> flips of the (transposed, for 5-8) stored pixels that show them upright
_FLIPS = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A C x H x W image as stored, shown upright for its EXIF ``orientation``, as PIL's ``exif_transpose`` does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
    return image.flip(_FLIPS[orientation]) if orientation in _FLIPS else image.contiguous()


class EncodedImage:
    """One photo as a worker hands it over: JPEG bytes (``shape`` None) with their EXIF ``orientation``, or decoded
    HxWx3 pixels (upright), and its view."""

    __slots__ = ("data", "orientation", "plan", "shape")

    def __init__(self, data: torch.Tensor, shape: tuple[int, int] | None, plan: Plan, orientation: int = 1) -> None:
        self.data, self.shape, self.plan, self.orientation = data, shape, plan, orientation


class EncodedDataset(Dataset):
    """(EncodedImage, label) pairs; label -1 for unlabelled images. The device decodes and augments them.

    ``transform`` is the CPU pipeline's albumentations Compose: its transforms draw each view (:func:`plan_view`),
    and its random stream is the one loader workers and :func:`carnet.data.dataset.seed_epoch` seed.
    """

    def __init__(self, root: Path, paths: Sequence[str], labels: Sequence[int] | None,
                 transform: A.BaseCompose) -> None:
        names = unsupported(transform)
        if names:
            raise ValueError(f"the device pipeline cannot apply {', '.join(names)}")
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[torch.Tensor, tuple[int, int] | None, tuple[int, int], int]:
        """(bytes or pixels as a flat uint8 tensor, pixel shape or None for a JPEG, shown shape, EXIF orientation
        still to apply) of row ``index``."""
        path = self.root / self.paths[index]
        data = path.read_bytes()
        if data.startswith(JPEG_MAGIC):
            shown, orientation = image_header(data)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, shown, orientation
        pixels = decode_image(path)  # PNG, WebP, ...: decoded here (upright), the same pixels as the CPU pipeline's
        return torch.from_numpy(np.ascontiguousarray(pixels)).view(-1), pixels.shape[:2], pixels.shape[:2], 1

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        data, pixel_shape, shown, orientation = self.load(index)
        return EncodedImage(data, pixel_shape, plan_view(self.transform, shown), orientation), self.labels[index]


class EncodedBatch:
    """A batch of encoded photos; :meth:`to` decodes and augments them on a device into uint8 NCHW pixels.

    All images travel in one flat tensor (one shared-memory block per batch from a loader worker, not one per
    image).
    """

    __slots__ = ("data", "orientations", "plans", "shapes", "sizes")

    def __init__(self, data: torch.Tensor, sizes: list[int], shapes: list[tuple[int, int] | None],
                 plans: list[Plan], orientations: list[int] | None = None) -> None:
        self.data, self.sizes, self.shapes, self.plans = data, sizes, shapes, plans
        self.orientations = orientations or [1] * len(sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def pin_memory(self) -> EncodedBatch:
        """Pinned host memory (the DataLoader's pin_memory=True): faster copies of raw pixels to the GPU."""
        return EncodedBatch(self.data.pin_memory(), self.sizes, self.shapes, self.plans, self.orientations)

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Decode and augment on ``device``: the uint8 N x 3 x H x W batch the model is given."""
        return apply_plans(decode_batch(self, torch.device(device)), self.plans)


def collate_encoded(items: Sequence[tuple[EncodedImage, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """The DataLoader's collate_fn for :class:`EncodedDataset`: one flat byte tensor, labels as a tensor."""
    images = [image for image, _ in items]
    data = torch.cat([image.data for image in images]) if images else torch.empty(0, dtype=torch.uint8)
    batch = EncodedBatch(data, [len(image.data) for image in images], [image.shape for image in images],
                         [image.plan for image in images], [image.orientation for image in images])
    return batch, torch.tensor([label for _, label in items], dtype=torch.long)


def _decode_one(data: torch.Tensor, device: torch.device, orientation: int) -> torch.Tensor:
    """One JPEG that the batched call refused (CMYK, 12-bit, damaged), upright: on the device if it can, else with
    PIL."""
    try:
        return orient(decode_jpeg(data, mode=ImageReadMode.RGB, device=device), orientation)
    except RuntimeError:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return torch.from_numpy(np.ascontiguousarray(pil_to_rgb(img))).permute(2, 0, 1).to(device)


def decode_batch(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """The batch's images as uint8 3xHxW tensors on ``device``, shown upright: JPEGs in one decode_jpeg call."""
    chunks = torch.split(batch.data, batch.sizes)
    images: list[torch.Tensor | None] = [None] * len(chunks)
    jpegs = [i for i, shape in enumerate(batch.shapes) if shape is None]
    if jpegs:
        if device.type == "cuda":
            # nvJPEG's hardware decoder writes its outputs before work already queued on the stream has run, into
            # memory the caching allocator may just have freed from it (pytorch/vision#9606): drain the stream.
            torch.cuda.current_stream(device).synchronize()
        # torchvision applies EXIF orientation on the CPU only (not with nvJPEG): orient() does it on any device
        try:
            decoded = [orient(image, batch.orientations[i]) for i, image in
                       zip(jpegs, decode_jpeg([chunks[i] for i in jpegs], mode=ImageReadMode.RGB, device=device),
                           strict=True)]
        except RuntimeError:  # one bad file fails the whole batched call: decode them one by one
            decoded = [_decode_one(chunks[i], device, batch.orientations[i]) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    for i, shape in enumerate(batch.shapes):
        if shape is not None:
            images[i] = chunks[i].view(*shape, 3).permute(2, 0, 1).to(device, non_blocking=True)
    return images  # type: ignore[return-value]


def _geometry(image: torch.Tensor, steps: Sequence[tuple[Any, ...]]) -> torch.Tensor:
    for step in steps:
        if step[0] == "crop":
            x0, y0, x1, y1 = step[1]
            image = image[:, y0:y1, x0:x1]
        else:
            size, flag = step[1], step[2]
            if tuple(image.shape[-2:]) != tuple(size):
                image = TF.resize(image, list(size), interpolation=_MODES[flag], antialias=True)
    return image


def apply_plans(images: Sequence[torch.Tensor], plans: Sequence[Plan]) -> torch.Tensor:
    """Crop and resize each image as its plan says, stack them, then flip and change brightness/contrast batched.

    Brightness/contrast is albumentations' (``clip(x * alpha + beta)``, truncated to uint8 like its lookup table).
    """
    batch = torch.stack([_geometry(image, plan[0]) for image, plan in zip(images, plans, strict=True)])
    flips = [i for i, plan in enumerate(plans) if plan[1]]
    if flips:
        index = torch.tensor(flips, device=batch.device)
        batch[index] = batch[index].flip(-1)
    if any(plan[2] != 1.0 or plan[3] != 0.0 for plan in plans):
        alpha = torch.tensor([plan[2] for plan in plans], dtype=torch.float32, device=batch.device)
        beta = torch.tensor([plan[3] for plan in plans], dtype=torch.float32, device=batch.device)
        batch = (batch.float() * alpha.view(-1, 1, 1, 1) + beta.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
    return batch
