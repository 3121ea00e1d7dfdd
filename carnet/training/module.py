"""The LightningModule: cross-entropy training of :class:`carnet.models.network.CarNet` with head and backbone rates.

The network, heads and checkpoint format live in :mod:`carnet.models` (no Lightning import there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.data import Mixup
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from carnet.config import plain
from carnet.models.checkpoint import CHECKPOINT_KEY
from carnet.models.heads import build_head
from carnet.models.network import CarNet, compile_network, create_backbone
from carnet.training.optim import param_groups


def mix_batches(mixup: dict[str, float], num_classes: int, label_smoothing: float) -> Mixup | None:
    """timm's Mixup/CutMix of training batches (``mixup``: conf/train.yaml), or None when both alphas are 0."""
    if not (mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0):
        return None
    return Mixup(mixup_alpha=mixup["mixup_alpha"], cutmix_alpha=mixup["cutmix_alpha"], prob=mixup["prob"],
                 switch_prob=mixup["switch_prob"], label_smoothing=label_smoothing, num_classes=num_classes)


class CarClassifier(pl.LightningModule):
    """LightningModule: cross-entropy training of :class:`CarNet` with head and backbone learning rates.

    Every argument is required: the recipe's values are stated once, in conf/ (carnet.training.builders.build_module
    builds this from a config), so code that builds one directly cannot get another recipe by leaving one out.
    ``compile`` and the optimizer's ``fused`` come resolved (carnet.runtime), never ``auto``.
    """

    def __init__(
        self,
        model_name: str,
        class_names: Sequence[str],
        head: dict[str, Any],
        *,
        image_size: int,
        pretrained: bool,
        weights: str | None,
        drop_rate: float,
        drop_path_rate: float,
        channels_last: bool,
        compile: bool | str,
        compile_backend: str,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None,
        backbone_lr_mult: float,
        label_smoothing: float,
        mixup: dict[str, float],
        layer_decay: float | None,
        scales: Sequence[float],
    ) -> None:
        super().__init__()
        head, optimizer, scheduler, mixup = plain(head), plain(optimizer), plain(scheduler), plain(mixup)
        self.save_hyperparameters({
            "model_name": model_name, "class_names": list(class_names), "head": head, "image_size": image_size,
            "pretrained": pretrained, "weights": weights, "drop_rate": drop_rate,
            "drop_path_rate": drop_path_rate, "channels_last": channels_last, "compile": compile,
            "compile_backend": compile_backend,
            "optimizer": optimizer, "scheduler": scheduler, "backbone_lr_mult": backbone_lr_mult,
            "layer_decay": layer_decay, "label_smoothing": label_smoothing, "mixup": mixup,
            "scales": [float(s) for s in scales],
        }, logger=False)  # carnet.training.loggers.LogConfig logs the whole run config instead
        kwargs = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate} if drop_path_rate or drop_rate else {}
        backbone = create_backbone(model_name, pretrained=pretrained, weights=weights, **kwargs)
        # CarNet normalises the uint8 batches itself (carnet.models.network.Normalize), with the backbone's timm
        # mean/std (data_config, which inference_meta records), on the device and in the run's precision.
        self.net = CarNet(backbone, build_head(head, backbone.num_features, len(class_names)), scales=scales)
        if channels_last:  # the net converts its input to match
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:  # in place (nn.Module.compile): state_dict keys, checkpoints and load_checkpoint unchanged
            compile_network(self.net, compile, compile_backend)  # True: the whole net; "regional": each block
        # Where this model was trained (run_dir, data_root), set by carnet.training.train: predict's split=val finds the
        # run's split.csv through it even after the checkpoint was copied out of <run dir>/checkpoints/.
        self.provenance: dict[str, str] = {}
        self.mix = mix_batches(mixup, len(class_names), label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes=len(class_names), average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=len(class_names), average="micro")

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    @property
    def head(self) -> nn.Module:
        return self.net.head

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of the backbone (mean, std, interpolation, crop_pct) at this run's image size."""
        config = timm.data.resolve_model_data_config(self.backbone)
        size = self.hparams.image_size
        return {**config, "input_size": (3, size, size)}

    def inference_meta(self) -> dict[str, Any]:
        """Everything needed to rebuild the network and feed it images, without any config."""
        config = self.data_config
        return {
            "model_name": self.hparams.model_name,
            "head": self.hparams.head,
            "class_names": list(self.hparams.class_names),
            "image_size": self.hparams.image_size,
            "mean": list(config["mean"]),
            "std": list(config["std"]),
            "interpolation": config["interpolation"],
            "crop_pct": float(config.get("crop_pct", 1.0)),
            "scales": list(self.net.scales),
            **self.provenance,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of uint8 (or float 0..255) NCHW pixels: the net normalises them (and matches its memory format)."""
        return self.net(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        return loss, logits, labels

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mix is not None and len(labels) % 2 == 0:  # timm's Mixup pairs each image with its mirror in the
            # batch, so it needs an even batch; an odd one (a last batch) trains unmixed.
            images, targets = self.mix(images.float(), labels)  # the net takes float 0..255 pixels as well as uint8
            logits = self(images)
            loss = F.cross_entropy(logits, targets)  # soft targets: the mixed labels, smoothed by the Mixup
        else:
            loss, logits, labels = self._step(batch)
        # Lean on purpose (benchmarks/train_step.py): each self.log costs ~2-3 ms of Lightning bookkeeping per step
        # on a CPU, and calling the metric (forward) computes a per-batch value nobody logs; `update` only
        # accumulates. The learning rates are recorded per epoch by RunArtifacts (per step: LearningRateMonitor).
        self.train_acc.update(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.val_acc(logits, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)  # mean over DDP ranks
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups (carnet.training.optim): head, then the backbone, by layer with ``layer_decay``."""
        return param_groups(self.head, self.backbone, self.hparams.optimizer["lr"], self.hparams.backbone_lr_mult,
                            self.hparams.layer_decay)

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.param_groups())
        if not self.hparams.scheduler:
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = instantiate(self.hparams.scheduler)(optimizer, total_steps=steps,
                                                        steps_per_epoch=max(1, steps // epochs))
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.inference_meta()
