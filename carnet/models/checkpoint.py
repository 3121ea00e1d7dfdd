"""The checkpoint format: everything inference needs under ``checkpoint["carnet"]``.

Model name, head config, class names, image size and normalisation travel with the weights, so
:func:`load_checkpoint` rebuilds the network from the file alone (predict, serve and export need nothing else).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch

from carnet.errors import CheckpointError
from carnet.models.files import load_weights_only
from carnet.models.heads import build_head
from carnet.models.network import CarNet, create_backbone

CHECKPOINT_KEY = "carnet"
META_KEYS = ("model_name", "head", "class_names", "mean", "std")  # what load_checkpoint rebuilds the network from


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a carnet checkpoint file (on the CPU), with a clear error for a missing or foreign file.

    ``weights_only=True``: tensors and plain Python values only, so a checkpoint someone hands us cannot run code
    while it is read (a pickle's ``__reduce__`` can); carnet keeps its metadata in plain types for that reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    checkpoint = load_weights_only(path, f"checkpoint {path}")
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a carnet checkpoint (no '{CHECKPOINT_KEY}' metadata)")
    if bad := nonfinite_tensors(checkpoint["state_dict"]):  # it would predict class 0 for everything, silently
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights in {len(bad)} tensor(s) (first: "
                              f"{bad[0]}): the run that wrote it diverged; train again with a lower optimizer.lr")
    return checkpoint


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` that hold NaN or infinity (one host sync).

    By their sums: a sum is NaN or infinite whenever an element is, and one summing pass costs a fraction of
    ``isfinite`` (B6's 43 M weights on one CPU thread: 60 ms against 0.6 s). A sum that overflows from finite values
    alone is a false alarm that ``isfinite`` then clears.
    """
    names = [name for name, value in state_dict.items()
             if isinstance(value, torch.Tensor) and value.is_floating_point()]
    if not names:
        return []
    device = state_dict[names[0]].device
    sums = torch.stack([state_dict[name].sum(dtype=torch.float32).to(device) for name in names])
    suspects = [name for name, ok in zip(names, torch.isfinite(sums).tolist(), strict=True) if not ok]
    return [name for name in suspects if not bool(torch.isfinite(state_dict[name]).all())]


def load_checkpoint(path: str | os.PathLike) -> tuple[CarNet, dict[str, Any]]:
    """Rebuild the network of a checkpoint for inference: (CarNet in eval mode on the CPU, its metadata).

    Needs nothing but the file: no config, no download (the backbone is built without pretrained weights and
    then gets the checkpoint's own).
    """
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its carnet metadata lacks {', '.join(missing)}")
    if not timm.is_model(meta["model_name"]):
        raise CheckpointError(f"checkpoint {path} was trained with model {meta['model_name']!r}, which timm "
                              f"{timm.__version__} does not know: use the timm version it was trained with")
    backbone = create_backbone(meta["model_name"], pretrained=False)
    net = CarNet(backbone, build_head(meta["head"], backbone.num_features, len(meta["class_names"])),
                 mean=meta["mean"], std=meta["std"],  # the normalisation it was trained with
                 scales=meta.get("scales", (1.0,)))  # checkpoints from before model.scales: the plain network
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:  # torch lists every missing, unexpected and mis-sized tensor on lines of its own
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its own metadata ({meta['model_name']}, "
                              f"{len(meta['class_names'])} classes): {' '.join(str(err).split())[:300]}") from None
    return net.eval(), meta
