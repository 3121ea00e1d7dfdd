"""What a checkpoint predicts, computed the plain way (load_checkpoint + the training eval transform), without
carnet's predict, serving or export code: the reference those are checked against.

The reference normalises by hand, in float64 from the metadata's mean and std, and runs backbone + head on the
result: the float pipeline carnet had before the network took uint8 pixels, independent of
:class:`carnet.models.network.Normalize`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image

from carnet.data.decode import decode_image
from carnet.data.transforms import build_eval_transform
from carnet.models.checkpoint import load_checkpoint


def eval_transform(meta: dict[str, Any]) -> A.Compose:
    """The eval view a checkpoint was validated with (its metadata: size, resize, crop)."""
    return build_eval_transform(meta["image_size"], meta["interpolation"], meta["crop_pct"])


def eval_batch(meta: dict[str, Any], images: Sequence[bytes]) -> torch.Tensor:
    """Encoded pictures (as uploaded) decoded by PIL and put through the checkpoint's eval view, stacked: the
    uint8 (N, 3, H, W) pixels every carnet model takes."""
    transform = eval_transform(meta)
    return torch.stack([transform(image=np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))["image"]
                        for b in images])


def normalise(pixels: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 (N, 3, H, W) pixels normalised by hand with the metadata's mean and std: float32 network input."""
    mean = torch.tensor(meta["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float64).view(1, 3, 1, 1)
    return ((pixels.double() / 255 - mean) / std).float()


def reference_logits(net: torch.nn.Module, pixels: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Backbone + head of a CarNet on hand-normalised pixels (its own normalisation bypassed)."""
    with torch.no_grad():
        return net.head(net.backbone(normalise(pixels, meta)))


def reference_probs(ckpt: Path, root: Path, paths: Sequence[str], *, hflip: bool = False) -> torch.Tensor:
    """Softmax of the checkpoint's network on its eval view of each image file (mirrored with ``hflip``)."""
    net, meta = load_checkpoint(ckpt)
    transform = eval_transform(meta)
    batch = torch.stack([transform(image=decode_image(root / p))["image"] for p in paths])
    return reference_logits(net, batch.flip(-1) if hflip else batch, meta).softmax(-1)
