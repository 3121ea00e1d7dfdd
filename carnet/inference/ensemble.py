"""The checkpoints of an ensemble: loaded with their own metadata, checked to predict the same classes, and
averaged with the ensemble weights.

Every checkpoint brings its own image size, normalisation and class names (``checkpoint["carnet"]``), so models
of different architectures and sizes can be ensembled: each gets its own loader
(:class:`carnet.inference.runner.Runner`), and the ensemble averages class probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carnet.errors import CheckpointError, PredictError
from carnet.models.checkpoint import load_checkpoint
from carnet.models.network import CarNet


@dataclass
class Model:
    """A loaded checkpoint: the network, its metadata and its weight in the ensemble."""

    path: Path
    net: CarNet
    meta: dict[str, Any]
    weight: float = 1.0
    label: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def _label(path: Path) -> str:
    """A short name: ``<run>/best.ckpt`` for a checkpoint in its run directory, else the file name."""
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def load_models(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> list[Model]:
    """Load every checkpoint of the ensemble and check that they predict the same classes."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise PredictError("ckpt is empty: expected a checkpoint path or a list ckpt=[a.ckpt,b.ckpt]")
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise PredictError(f"weights has {len(weights)} value(s) for {len(paths)} checkpoint(s); expected one each")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PredictError(f"weights={weights}: expected non-negative values with a positive sum")
    models = []
    for i, (path, weight) in enumerate(zip(paths, weights, strict=True)):
        try:
            net, meta = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as err:  # a carnet checkpoint whose weights do not fit its own metadata
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err})") from err
        label = _label(path) if len(paths) == 1 else f"#{i + 1} {_label(path)}"
        models.append(Model(path, net, meta, float(weight), label))
    first = models[0]
    for other in models[1:]:
        if other.class_names != first.class_names:
            raise PredictError(
                f"checkpoints predict different classes: {first.path} has {len(first.class_names)} "
                f"{first.class_names}, {other.path} has {len(other.class_names)} {other.class_names}; an ensemble "
                f"needs the same class names in the same order")
    return models


def ensemble(probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the models' (images, classes) probabilities."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    w = w / w.sum()
    return sum(wi * p for wi, p in zip(w.tolist(), probs, strict=True))
