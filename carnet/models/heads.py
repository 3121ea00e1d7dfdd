"""Replaceable classification heads on a backbone's pooled features (``conf/head``).
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn


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


def build_head(head: dict[str, Any] | DictConfig, in_features: int, num_classes: int) -> nn.Module:
    """Instantiate a head config (``_target_`` + its arguments) for the backbone's feature width."""
    return instantiate(head, in_features=in_features, num_classes=num_classes)
