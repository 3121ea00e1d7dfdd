"""The network: pixel normalisation, a timm backbone without its classifier and a replaceable head (:class:`CarNet`).

The network takes uint8 (or float 0..255) NCHW pixels and normalises them itself (:class:`Normalize`): loader
workers hand over 4x smaller uint8 batches, the normalisation runs on the model's device in its precision and memory
format, and training, predict, serving and the exported files share that one definition of the input.

No Lightning import here: a web-service worker saves ~300 MB and seconds of start-up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from carnet.errors import CarnetError


class WeightsError(CarnetError):
    """A weights file does not fit the backbone; the message names the file and the keys."""


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local ``.safetensors`` / ``.pth`` state dict in timm's key names into a headless backbone.

    The original classifier's keys are ignored (carnet brings its own head); any other missing or unexpected
    key is an error that names them, because a silently half-loaded backbone trains like a random one.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights={path}: file not found (expected a .safetensors or .pth state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers of training checkpoints
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier", "classifier")
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"model.weights={path} does not fit {type(backbone).__name__}: missing keys "
            f"{result.missing_keys[:10]}{' ...' if len(result.missing_keys) > 10 else ''}, unexpected keys "
            f"{result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``: it returns pooled features)."""
    backbone = timm.create_model(name, pretrained=pretrained and not weights, num_classes=0, **kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


class Normalize(nn.Module):
    """Pixels (uint8 or float in 0..255, NCHW) -> the backbone's normalised float input: ``(x - 255 mean) / 255 std``.

    mean and std are non-persistent buffers: they follow the module to its device and dtype but stay out of the
    state dict, so checkpoints keep their keys (older ones load) and the values come from the model's data config
    or the checkpoint's metadata. The output has the parameters' dtype, or autocast's (bf16/fp16), which the first
    convolution would cast to anyway; ``channels_last`` converts the uint8 input (cheapest) before the arithmetic,
    which keeps its memory format.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("offset", torch.tensor(self.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", 1 / (torch.tensor(self.std).view(1, -1, 1, 1) * 255), persistent=False)

    def forward(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # A fresh copy (uint8 -> float) is normalised in place: no further batch-sized allocation, 2x faster on a
        # CPU. A tensor already in that dtype is the caller's: never written.
        x = images.to(self.scale.dtype)
        x = (x - self.offset) * self.scale if x is images else x.sub_(self.offset).mul_(self.scale)
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        return x

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class CarNet(nn.Module):
    """Normalisation + backbone + head: the plain ``nn.Module`` that training, inference, serving and export use.

    Input: uint8 (or float 0..255) NCHW pixels, any size the backbone accepts. mean/std default to the
    backbone's timm data config (what its pretrained weights expect).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        if mean is None or std is None:
            config = timm.data.resolve_model_data_config(backbone)
            mean = config["mean"] if mean is None else mean
            std = config["std"] if std is None else std
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head

    def uses_channels_last(self) -> bool:
        """Whether the weights are in channels_last (``net.to(memory_format=torch.channels_last)``): the input is
        then converted too, so no caller has to remember it. Read from the first 4-D weight (the stem)."""
        for param in self.backbone.parameters():
            if param.dim() == 4:
                return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
        return False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of pixel batches (what the head sees; carnet.training.head_fit fits on them)."""
        return self.backbone(self.normalize(images, self.uses_channels_last()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
