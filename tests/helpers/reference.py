"""What a checkpoint predicts, computed the plain way (load_checkpoint + the training eval transform), without
carnet's predict, serving or export code: the reference those are checked against."""

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
    """The eval view a checkpoint was validated with (its metadata: size, normalisation, resize)."""
    return build_eval_transform(meta["image_size"], meta["mean"], meta["std"], meta["interpolation"],
                                meta["crop_pct"])


def eval_batch(meta: dict[str, Any], images: Sequence[bytes]) -> torch.Tensor:
    """Encoded pictures (as uploaded) decoded by PIL and put through the checkpoint's eval view, stacked."""
    transform = eval_transform(meta)
    return torch.stack([transform(image=np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))["image"]
                        for b in images])


def reference_probs(ckpt: Path, root: Path, paths: Sequence[str], *, hflip: bool = False) -> torch.Tensor:
    """Softmax of the checkpoint's network on its eval view of each image file (mirrored with ``hflip``)."""
    net, meta = load_checkpoint(ckpt)
    transform = eval_transform(meta)
    batch = torch.stack([transform(image=decode_image(root / p))["image"] for p in paths])
    with torch.no_grad():
        return net(batch.flip(-1) if hflip else batch).softmax(-1)
