"""The optimizer's parameter groups: the head at the optimizer's rate, the backbone at ``backbone_lr_mult`` times
that, and with ``layer_decay`` each backbone layer at ``layer_decay`` times the rate of the layer above it.

The whole backbone is always in the optimizer, frozen parts included: a frozen tensor has no gradient and
optimizers skip it, so unfreezing later needs no optimizer surgery and every scheduler's per-group state
(ReduceLROnPlateau, CyclicLR) stays valid, also across resumes. That is why the layers come from timm's
``group_parameters`` (the model's own ``group_matcher``, the grouping timm's ``param_groups_layer_decay`` uses) and
not from that function itself: it leaves out parameters that do not require gradients at the time, and it sets
its own weight decay per group, where carnet keeps the optimizer's.
"""

from __future__ import annotations

from typing import Any

from timm.models import group_parameters
from torch import nn


def backbone_layers(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters by layer, input side first, as timm groups them for layer-wise decay (its
    ``group_matcher``, per block); one layer for a model without one."""
    if not hasattr(backbone, "group_matcher"):
        return [list(backbone.parameters())]
    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    count = max(layer_of.values(), default=0) + 1
    layers: list[list[nn.Parameter]] = [[] for _ in range(count)]
    for name, param in backbone.named_parameters():
        layers[layer_of.get(name, count - 1)].append(param)
    return [layer for layer in layers if layer]


def param_groups(head: nn.Module, backbone: nn.Module, lr: float, backbone_lr_mult: float,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """The optimizer's groups, each with its ``lr`` and a ``name`` (the learning-rate columns of metrics.csv)."""
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": lr, "name": "head"}]
    backbone_lr = lr * backbone_lr_mult
    if layer_decay is None:
        return [*groups, {"params": list(backbone.parameters()), "lr": backbone_lr, "name": "backbone"}]
    layers = backbone_layers(backbone)
    return [*groups, *({"params": params, "lr": backbone_lr * layer_decay ** (len(layers) - 1 - i),
                        "name": f"backbone.{i}"} for i, params in enumerate(layers))]
