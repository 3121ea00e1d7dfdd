"""Optimizer options that depend on where the weights live, resolved when the optimizer is built."""

from __future__ import annotations

from typing import Any

import torch

from carnet.errors import CarnetError


def resolve_fused(optimizer: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``fused: auto`` (conf/optimizer) -> True for weights on CUDA, False elsewhere.

    The fused AdamW kernel updates every tensor in one launch instead of a few per tensor (B6 has ~700), so it
    only pays on a GPU; on the CPU the optimizer stays as it was. An explicit true/false is passed on as given.
    """
    fused = optimizer.get("fused")
    if fused is None or isinstance(fused, bool):
        return optimizer
    if str(fused).lower() != "auto":
        raise CarnetError(f"optimizer.fused={fused!r}: expected true, false or auto")
    return {**optimizer, "fused": torch.device(device).type == "cuda"}
