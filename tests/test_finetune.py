"""The unfreezing callback: which tensors train, which stay bit-identical, what BatchNorm does
(carnet/training/finetune.py).

Runs are real (in-process) ``carnet.training.train.train`` runs on tiny data; expectations are computed here from the
parameter names, independently of carnet.training.finetune's use of timm's group_matcher.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelSummary
from torch import nn

from carnet.errors import CarnetError
from carnet.runtime import resolve_runtime
from carnet.training.builders import build_module
from carnet.training.finetune import ProgressiveUnfreezing, fraction_at, parse_schedule
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.recipe import classifier


def efficientnet_blocks(names: list[str]) -> list[list[str]]:
    """An EfficientNet's blocks by name, input side first: stem, each blocks.S.R, and conv_head + bn2 as part of
    the last blocks.S.R (timm's group_matcher merges the head conv into it)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        match = re.match(r"blocks\.(\d+)\.(\d+)\.", name)
        if name.startswith(("conv_stem.", "bn1.")):
            key: tuple[int, ...] = (0,)
        elif match:
            key = (1, int(match[1]), int(match[2]))
        else:
            assert name.startswith(("conv_head.", "bn2.")), name
            key = (2,)
        groups.setdefault(key, []).append(name)
    ordered = [groups[k] for k in sorted(groups)]
    return [*ordered[:-2], ordered[-2] + ordered[-1]]


def run_fraction(tiny_data: Path, run_dir: Path, model: str, fraction: float, bn: str,
                 *extra: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Train one epoch with ``unfreeze=fraction``; return (summary, start state, end state, config)."""
    cfg = compose_cfg([*ONE_BATCH, f"model={model}", "model.weights=null",
                       "model.drop_rate=0", "model.drop_path_rate=0", "image_size=32", f"data.root={tiny_data}",
                       f"unfreeze={fraction}", f"bn={bn}", f"run_dir={run_dir}", *extra])
    pl.seed_everything(cfg.seed, workers=True)  # train() seeds the same way before building: same start weights
    start = {k: v.clone() for k, v in build_module(cfg, resolve_runtime(cfg)).state_dict().items()}
    summary = train(cfg)
    end = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return summary, start, end, cfg


# Each case with another scheduler: none of them may change what is frozen (plateau: tests/test_phases.py).
CASES = [
    ("test_efficientnet", 0.5, "frozen", "cosine"),
    ("test_efficientnet", 0.5, "train", "onecycle"),
    ("tf_efficientnet_lite0", 0.75, "frozen", "cyclic"),
    ("tf_efficientnet_lite0", 0.25, "train", "none"),
]


@pytest.mark.parametrize(("model", "fraction", "bn", "scheduler"), CASES)
def test_only_last_fraction_of_blocks_trains(tiny_data: Path, tmp_path: Path, model: str, fraction: float,
                                             bn: str, scheduler: str) -> None:
    summary, start, end, _ = run_fraction(tiny_data, tmp_path / "run", model, fraction, bn,
                                          f"scheduler={scheduler}")
    backbone = {k.removeprefix("net.backbone."): v for k, v in start.items() if k.startswith("net.backbone.")}
    params = {k for k in backbone if not re.search(r"running_(mean|var)|num_batches_tracked", k)}
    blocks = efficientnet_blocks(list(backbone))
    keep = math.ceil(fraction * len(blocks))
    assert 0 < keep < len(blocks)
    frozen = {name for block in blocks[: len(blocks) - keep] for name in block}
    frozen_bn_stats = {n for n in frozen if re.search(r"running_(mean|var)$", n)}
    frozen_bn_params = {n for n in frozen & params if n.rsplit(".", 2)[-2].startswith("bn")}
    assert frozen_bn_stats and frozen_bn_params

    head = sum(v.numel() for k, v in start.items() if k.startswith("net.head."))
    unfrozen = sum(backbone[n].numel() for n in params - frozen)
    train_bn = bn == "train"
    expected = head + unfrozen + (sum(backbone[n].numel() for n in frozen_bn_params) if train_bn else 0)
    assert summary.trainable_params == expected
    assert summary.unfrozen_fraction == fraction

    def moved(names: set[str]) -> set[str]:
        return {n for n in names if not torch.equal(start[f"net.backbone.{n}"], end[f"net.backbone.{n}"])}

    frozen_weights = (frozen & params) - (frozen_bn_params if train_bn else set())
    assert moved(frozen_weights) == set(), "frozen tensors must stay bit-identical"
    assert moved(params - frozen), "the unfrozen blocks must train"
    if train_bn:
        assert moved(frozen_bn_stats) == frozen_bn_stats, "bn=train: BatchNorm statistics re-estimated"
        assert moved(frozen_bn_params), "bn=train: BatchNorm affine parameters train"
    else:
        assert moved(frozen - params) == set(), "frozen BatchNorm: running statistics unchanged"


def test_schedule() -> None:
    schedule = parse_schedule([[5, 0.5], [0, 0.0], [15, 1.0]])
    assert schedule == parse_schedule({0: 0.0, "5": 0.5, 15: 1})
    assert [fraction_at(schedule, e) for e in (0, 4, 5, 14, 15, 99)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert fraction_at(parse_schedule({2: 1.0}), 1) == 0.0  # before the first entry: head only
    assert parse_schedule(0.75) == [(0, 0.75)]
    for bad in (1.5, {0: -0.1}, {-1: 0.5}, [[0, 0.5, 1]], {}, "half"):
        with pytest.raises(ValueError, match="unfreeze"):
            parse_schedule(bad)


def test_schedule_steps_set_requires_grad_and_batchnorm_modes() -> None:
    """Each epoch's state depends on the epoch only: unfreezing puts BatchNorm back in train mode, and going
    back to an earlier epoch (as a resume does) gives that epoch's frozen set again."""
    module = classifier(class_names=list("abc"))
    module.train()
    norms = [m for m in module.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    head = sum(p.numel() for p in module.head.parameters())
    callback = ProgressiveUnfreezing([[0, 0.0], [2, 1.0]], bn="per_block")
    states = []
    for epoch in (0, 1, 2, 0):
        assert callback.apply(module, epoch) == (1.0 if epoch == 2 else 0.0)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        states.append((trainable, [m.training for m in norms]))
    assert states[0] == states[1] == states[3] == (head, [False] * len(norms))
    assert states[2] == (sum(p.numel() for p in module.parameters()), [True] * len(norms))


def test_bn_frozen_keeps_every_running_statistic(tiny_data: Path, tmp_path: Path) -> None:
    """bn=frozen: unfrozen blocks train (BatchNorm scale/shift included) but no statistic moves."""
    _, start, end, _ = run_fraction(tiny_data, tmp_path / "run", "test_efficientnet", 0.5, "frozen")
    stats = [k for k in start if k.startswith("net.backbone.") and re.search(r"running_(mean|var)$", k)]
    assert stats and all(torch.equal(start[k], end[k]) for k in stats)
    last_bn = "net.backbone.bn2.weight"  # in the last (unfrozen) block: it trains
    assert not torch.equal(start[last_bn], end[last_bn])
    # The same run with bn=per_block re-estimates the unfrozen blocks' statistics, and only theirs.
    _, start, end, _ = run_fraction(tiny_data, tmp_path / "run2", "test_efficientnet", 0.5, "per_block")
    assert not torch.equal(start["net.backbone.bn2.running_mean"], end["net.backbone.bn2.running_mean"])
    assert torch.equal(start["net.backbone.bn1.running_mean"], end["net.backbone.bn1.running_mean"])


def test_unknown_bn_policy_is_one_clear_error() -> None:
    with pytest.raises(CarnetError, match=r"bn='sometimes': expected one of frozen, per_block, train"):
        ProgressiveUnfreezing(0.5, bn="sometimes")


class SummaryProbe(ModelSummary):
    """Lightning's model summary as it is printed, its trainable count also written to ``path`` (for the test)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        Path(self.path).write_text(json.dumps(self._summary(trainer, pl_module).trainable_parameters))


def test_model_summary_counts_what_trains(tiny_data: Path, tmp_path: Path) -> None:
    """The summary table Lightning prints at the start agrees with summary.json: the backbone is frozen before it."""
    probe = tmp_path / "summary_trainable.json"
    summary, start, _, _ = run_fraction(tiny_data, tmp_path / "run", "test_efficientnet", 0.0, "frozen",
                                        "trainer.enable_model_summary=true",
                                        f"+callbacks.summary={{_target_: tests.test_finetune.SummaryProbe, "
                                        f"path: '{probe}'}}")
    head = sum(v.numel() for k, v in start.items() if k.startswith("net.head."))
    assert summary.trainable_params == head
    assert json.loads(probe.read_text()) == summary.trainable_params
