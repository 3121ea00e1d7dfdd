"""The network: a timm backbone without its classifier plus a replaceable head (:class:`CarNet`).

No Lightning import here: a web-service worker saves ~300 MB and seconds of start-up.
"""

from __future__ import annotations

import os
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


class CarNet(nn.Module):
    """Backbone + head: the plain ``nn.Module`` that inference, serving and export use."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
