"""The pipeline's uniform soup (``pipeline.soup``): the average of the weights its phases ended with.

Each phase starts from the one before, so their ends lie close together in weight space, and their average (a
"uniform soup", Wortsman et al. 2022; with two members it is WiSE-FT's halfway point between the fitted head and a
fine-tuned network) often predicts better than any one of them, at no cost at inference: it is one network. The
members are the phase ends that trained (the refit's, or without refit the phases' hand-offs): the head phase, and
each unfreezing phase that took a step and did not keep its start; a phase at another image size than the last
(``finetune_448``) is left out. BatchNorm statistics are averaged with the weights; integer buffers come from the
last member, and so does everything inference reads (classes, image size, the eval view).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from carnet.artifacts import atomic_path
from carnet.errors import CheckpointError
from carnet.models.checkpoint import CHECKPOINT_KEY, read_checkpoint

SOUP_FILE = "soup.ckpt"


def soup_members(checkpoints: list[Path]) -> dict[Path, dict[str, Any]]:
    """Those of ``checkpoints`` (the phase ends that trained, in order) at the last one's image size, each read once
    (for its size here and its weights in :func:`write_soup`)."""
    loaded = {path: read_checkpoint(path) for path in checkpoints}
    if not checkpoints:
        return {}
    size = loaded[checkpoints[-1]][CHECKPOINT_KEY]["image_size"]
    return {path: c for path, c in loaded.items() if c[CHECKPOINT_KEY]["image_size"] == size}


def write_soup(members: dict[Path, dict[str, Any]], path: Path) -> Path:
    """``path``: the checkpoint of the last member, with each floating-point tensor the members' mean."""
    *_, (last_path, last) = members.items()
    for member, checkpoint in members.items():
        if checkpoint["state_dict"].keys() != last["state_dict"].keys():
            raise CheckpointError(f"soup: {member} has other weights than {last_path} (another architecture); "
                                  "expected the phase ends of one network")
    state_dict = {}
    for key, value in last["state_dict"].items():
        if value.is_floating_point():
            value = torch.stack([c["state_dict"][key].float() for c in members.values()]).mean(0).to(value.dtype)
        state_dict[key] = value
    with atomic_path(path) as tmp:
        torch.save({**last, "state_dict": state_dict}, tmp)
    return path
