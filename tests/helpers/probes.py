"""Callbacks that record what a real run did, put into it through its `callbacks` config
(`+callbacks.NAME={_target_: tests.helpers.probes.WhatRan, path: ...}`), for tests to compare with what it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import AsyncCheckpointIO

from carnet.data.device_pipeline import EncodedDataset
from carnet.models.network import compile_status


class WhatRan(pl.Callback):
    """Writes to ``path`` what the run trains with once training starts, read from the objects themselves (the
    Trainer, the network, the optimizer, the training loader), under the keys of summary.json's ``resolved``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        compiled = {None: False, "full": True, "regional": "regional"}[compile_status(pl_module.net)]
        self.path.write_text(json.dumps({
            "device": pl_module.device.type,
            "trainer.precision": trainer.precision,
            "trainer.benchmark": torch.backends.cudnn.benchmark,
            "model.channels_last": pl_module.net.uses_channels_last(),
            "model.compile": compiled,
            "optimizer.fused": trainer.optimizers[0].defaults.get("fused"),
            "checkpoint.async_save": isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO),
            "data.decode": "cpu" if not isinstance(loader.dataset, EncodedDataset)
            else "gpu" if pl_module.device.type == "cuda" else "device",
            "data.num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory,
            "world_size": trainer.world_size,
        }))
