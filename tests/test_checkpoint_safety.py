"""A checkpoint that someone hands us is read without running any code in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from carnet.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint


class Payload:
    """What a malicious pickle does: call something while being loaded (here: create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "carnet": {"model_name": "test_efficientnet"}, "x": Payload(marker)}, evil)
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"evil\.ckpt holds Python objects .* refuses to unpickle"):
            load(evil)
    assert not marker.exists()


def test_carnet_checkpoints_load_with_weights_only(tiny_checkpoint: Path) -> None:
    checkpoint = read_checkpoint(tiny_checkpoint)
    assert "state_dict" in checkpoint and checkpoint["carnet"]["class_names"]
