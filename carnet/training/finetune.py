"""Progressive unfreezing: keep a backbone frozen except its last fraction ``f`` of blocks, on an epoch schedule.

Why not Lightning's ``BaseFinetuning``: it adds newly unfrozen layers to the optimizer as new param groups, which
breaks schedulers that keep per-group state (ReduceLROnPlateau, CyclicLR: Lightning #8720, #12141) and, on resume,
re-freezes and re-adds groups that the checkpoint already has (#21901). carnet's optimizer holds the whole
backbone from the first step (``CarClassifier.param_groups``: frozen tensors get no gradient, so the optimizer
skips them). This callback therefore only flips ``requires_grad`` and BatchNorm modes, and what it flips is a pure
function of (schedule, epoch): a run resumed from ``last.ckpt`` gets exactly the frozen set and the optimizer
groups of an uninterrupted run.

Blocks are counted in the backbone's own order, input side first, with timm's ``group_matcher`` (the grouping
timm uses for layer-wise LR decay), so the same fraction means the same thing for any timm model: for an
EfficientNet the blocks are the stem, every ``blocks.S.R`` and the head conv (timm merges it into the last block).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import pytorch_lightning as pl
import torch
from timm.models._manipulate import group_with_matcher
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from carnet.config_check import BN_POLICIES
from carnet.errors import CarnetError
from carnet.models.network import compile_status
from carnet.summary import RunSummary

Schedule = list[tuple[int, float]]


def _tensor_names(module: nn.Module) -> Iterator[tuple[str, Any]]:
    return chain(module.named_parameters(), module.named_buffers())


def _trainable(module: nn.Module) -> frozenset[str]:
    return frozenset(name for name, param in module.named_parameters() if param.requires_grad)


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """Names of the parameters and buffers of each block of ``backbone``, input side first.

    timm models describe their blocks with ``group_matcher(coarse=False)``. A model without one falls back to
    its top-level children in registration order (the forward order of nearly every CNN).
    """
    matcher = getattr(backbone, "group_matcher", None)
    if callable(matcher):
        groups = group_with_matcher(_tensor_names(backbone), matcher(coarse=False))
        return [groups[k] for k in sorted(groups)]
    blocks: dict[str, list[str]] = {}
    for name, _ in _tensor_names(backbone):
        blocks.setdefault(name.split(".", 1)[0], []).append(name)
    return list(blocks.values())


def unfrozen_block_count(num_blocks: int, fraction: float) -> int:
    """How many blocks (from the output side) fraction ``f`` unfreezes: ceil(f * n), so any f > 0 unfreezes one."""
    return min(num_blocks, max(0, math.ceil(fraction * num_blocks - 1e-9)))


def parse_schedule(schedule: float | Mapping[Any, float] | Sequence[Sequence[float]]) -> Schedule:
    """``f``, ``{epoch: f}`` or ``[[epoch, f], ...]`` -> sorted ``[(epoch, f), ...]``; before the first epoch f = 0.

    (Configs use the list form: on Hydra's command line a list replaces a list, while a mapping would merge.)
    """
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        schedule = {0: schedule}
    if isinstance(schedule, Sequence) and not isinstance(schedule, str):
        if not all(isinstance(e, Sequence) and not isinstance(e, str) and len(e) == 2 for e in schedule):
            raise CarnetError(f"unfreeze={schedule!r}: expected a list of [epoch, fraction] pairs")
        schedule = dict(schedule)
    if not isinstance(schedule, Mapping) or not schedule:
        raise CarnetError(f"unfreeze={schedule!r}: expected a fraction in [0, 1], {{epoch: fraction}} or "
                         "[[epoch, fraction], ...], e.g. [[0, 0.0], [5, 0.5], [15, 1.0]]")
    parsed = []
    for epoch, fraction in schedule.items():
        try:
            epoch_i, fraction_f = int(epoch), float(fraction)
        except (TypeError, ValueError) as err:
            raise CarnetError(f"unfreeze: entry {epoch!r}: {fraction!r} is not epoch (int): fraction (float)") from err
        if epoch_i < 0 or not 0.0 <= fraction_f <= 1.0:
            raise CarnetError(f"unfreeze: entry {epoch!r}: {fraction!r}: expected epoch >= 0 and 0 <= fraction <= 1")
        parsed.append((epoch_i, fraction_f))
    return sorted(parsed)


def fraction_at(schedule: Schedule, epoch: int) -> float:
    """The unfrozen fraction of ``epoch``: the value of the last schedule entry at or before it (0 before any)."""
    fraction = 0.0
    for start, value in schedule:
        if start <= epoch:
            fraction = value
    return fraction


def freeze_backbone(backbone: nn.Module, fraction: float, train_bn: bool = False) -> list[_BatchNorm]:
    """Make only the last ``fraction`` of the backbone's blocks trainable; return the frozen BatchNorm modules.

    Frozen BatchNorm layers are the caller's to keep in eval mode (their running statistics must not move).
    With ``train_bn`` every BatchNorm layer stays trainable and in train mode, frozen block or not (fastai's
    default: the statistics of a new dataset differ from ImageNet's).
    """
    blocks = backbone_blocks(backbone)
    keep = unfrozen_block_count(len(blocks), fraction)
    frozen_names = {name for block in blocks[: len(blocks) - keep] for name in block}
    norms = {name: m for name, m in backbone.named_modules() if isinstance(m, _BatchNorm)}
    norm_tensors = {f"{n}.{t}" for n, m in norms.items() for t, _ in _tensor_names(m) if "." not in t}
    for name, param in backbone.named_parameters():
        trainable = name not in frozen_names or (train_bn and name in norm_tensors)
        if not trainable and param.grad is not None:
            param.grad = None  # a stale gradient would still be applied (e.g. weight decay) by the next step
        param.requires_grad_(trainable)
    if train_bn:
        return []
    return [m for n, m in norms.items() if any(f"{n}.{t}" in frozen_names for t, _ in _tensor_names(m))]


class ProgressiveUnfreezing(pl.Callback):
    """Freeze the LightningModule's ``backbone`` except its last fraction of blocks, per epoch of a schedule.

    ``schedule``: a fraction (whole run) or ``{epoch: fraction}``. The head always trains. Newly unfrozen
    layers train at the backbone param group's LR (``backbone_lr_mult`` x the head's), already in the optimizer.
    """

    def __init__(self, schedule: float | Mapping[Any, float], *, bn: str) -> None:
        self.schedule = parse_schedule(schedule)
        if bn not in BN_POLICIES:
            raise CarnetError(f"bn={bn!r}: expected one of {', '.join(BN_POLICIES)}")
        self.bn = bn
        self.train_bn = bn == "train"
        # bn=frozen, Keras' advice for fine-tuning: every BatchNorm of the backbone, unfrozen ones included, keeps
        # its running statistics (eval mode) while its scale and shift train. Re-estimating them on a small or unlike
        # dataset shifts every feature the head was trained on (measured: lite0 on the demo data drops from 0.64 to
        # 0.27 val acc after unfreezing half of it, with the learning rate at 0).
        self.freeze_bn_stats = bn == "frozen"
        self.fraction: float | None = None
        self.frozen_norms: list[_BatchNorm] = []

    def apply(self, pl_module: pl.LightningModule, epoch: int) -> float:
        """Set the frozen set of ``epoch`` (idempotent, depends on nothing else); return its fraction."""
        self.fraction = fraction_at(self.schedule, epoch)
        previous = self.frozen_norms
        backbone = pl_module.backbone
        trainable = _trainable(backbone)
        self.frozen_norms = freeze_backbone(backbone, self.fraction, self.train_bn)
        if _trainable(backbone) != trainable and compile_status(pl_module) is not None:
            # pytorch#139476: dynamo (before torch 2.12's guard on requires_grad, pytorch#177158) may reuse a graph
            # compiled for the old frozen set: no gradient for a newly unfrozen block, or one for a frozen block.
            # Every graph recompiles at the next step instead (from the on-disk cache where it has them).
            torch.compiler.reset()
        if self.freeze_bn_stats:
            self.frozen_norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
        still_frozen = {id(m) for m in self.frozen_norms}
        for module in previous:  # newly unfrozen BatchNorm layers train again (and update their statistics)
            if id(module) not in still_frozen:
                module.train(pl_module.training)
        self._norms_to_eval()
        return self.fraction

    def add_to_summary(self, summary: RunSummary) -> None:
        """summary.json's ``unfrozen_fraction``: where the schedule stood when the run ended (:class:`SummaryReporter`;
        a run without a schedule trains everything and reports none)."""
        summary.unfrozen_fraction = self.fraction if self.fraction is not None else fraction_at(self.schedule, 0)

    def _norms_to_eval(self) -> None:
        for module in self.frozen_norms:
            if module.training:
                module.eval()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before anything looks at the model: Lightning's ModelSummary table (on_fit_start) would otherwise count the
        # whole backbone as trainable. Only requires_grad here: BatchNorm modes are set in on_train_start (Lightning
        # warns about modules in eval mode before that), as is a resumed run's own epoch, once the checkpoint has
        # restored it (its printed summary shows epoch 0's frozen set).
        if stage == "fit":
            freeze_backbone(pl_module.backbone, fraction_at(self.schedule, trainer.current_epoch),
                            self.train_bn)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After checkpoint restore, so current_epoch is the resumed one; also covers a mid-epoch resume, for which
        # Lightning skips on_train_epoch_start.
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._norms_to_eval()  # in case anything switched the whole model to train mode (e.g. a validation loop)

    def state_dict(self) -> dict[str, Any]:
        # Informational only: the frozen set is recomputed from (schedule, epoch), never restored from here.
        return {"schedule": [list(entry) for entry in self.schedule], "bn": self.bn,
                "fraction": self.fraction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [tuple(entry) for entry in state_dict.get("schedule", [])]
        if saved and saved != [tuple(entry) for entry in self.schedule]:
            warnings.warn(f"resuming with unfreeze schedule {dict(self.schedule)}, but the checkpoint was trained "
                          f"with {dict(saved)}: the frozen set follows the new schedule", stacklevel=2)

