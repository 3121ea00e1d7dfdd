"""The network and its checkpoints, without Lightning: what predict, serve and export need.

A timm backbone without its classifier plus a replaceable head (:class:`CarNet`). A carnet checkpoint carries
everything inference needs under ``checkpoint["carnet"]`` (model name, head config, class names, image size,
normalisation), so :func:`load_checkpoint` rebuilds the network from the file alone. This module does not
import pytorch_lightning: a web-service worker saves ~300 MB and seconds of start-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

CHECKPOINT_KEY = "carnet"


class LinearHead(nn.Sequential):
    """Dropout then one linear layer on the pooled features."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class MLPHead(nn.Sequential):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: more capacity on top of a frozen backbone."""

    def __init__(self, in_features: int, num_classes: int, hidden_dim: int = 512, dropout: float = 0.3) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )


class WeightsError(ValueError):
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


def build_head(head: dict[str, Any] | DictConfig, in_features: int, num_classes: int) -> nn.Module:
    """Instantiate a head config (``_target_`` + its arguments) for the backbone's feature width."""
    return instantiate(head, in_features=in_features, num_classes=num_classes)


class CarNet(nn.Module):
    """Backbone + head: the plain ``nn.Module`` that inference, serving and export use."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class CheckpointError(ValueError):
    """A checkpoint cannot be read or is not a carnet checkpoint; the message names the file."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a carnet checkpoint file (on the CPU), with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a carnet checkpoint (no '{CHECKPOINT_KEY}' metadata)")
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> tuple[CarNet, dict[str, Any]]:
    """Rebuild the network of a checkpoint for inference: (CarNet in eval mode on the CPU, its metadata).

    Needs nothing but the file: no config, no download (the backbone is built without pretrained weights and
    then gets the checkpoint's own).
    """
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    backbone = create_backbone(meta["model_name"], pretrained=False)
    net = CarNet(backbone, build_head(meta["head"], backbone.num_features, len(meta["class_names"])))
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval(), meta
