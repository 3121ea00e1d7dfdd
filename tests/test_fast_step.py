"""The training step's GPU fast paths that can be checked on a CPU: fused AdamW only where the weights are on CUDA,
and a progress bar that reads the step's loss (a host-device sync) only when it redraws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from carnet.runtime import resolve_runtime
from carnet.training.builders import build_datamodule, build_module, build_trainer
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_fused_auto_is_off_on_the_cpu(optimizer: str, tiny_data: Path, tmp_path: Path) -> None:
    """conf/optimizer's `fused: auto` reaches the optimizer of a real fit as a bool: False for CPU weights."""
    cfg = compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"optimizer={optimizer}", f"run_dir={tmp_path}"])
    assert cfg.optimizer.fused == "auto"
    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime)
    trainer = build_trainer(cfg, tmp_path, [], runtime)
    trainer.fit(module, datamodule=build_datamodule(cfg, module, runtime))
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"] is False and [g["name"] for g in opt.param_groups] == ["head", "backbone"]


def test_fused_reaches_the_optimizer_as_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimizer.fused=auto is resolved once with the run's other autos (tests/test_runtime.py) and reaches the
    optimizer's config as that bool; an optimizer without the option (sgd) gets no `fused` key."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the resolver looks
    for accelerator, setting, fused in (("auto", "auto", True), ("auto", "false", False), ("cpu", "auto", False)):
        cfg = compose_cfg([*TINY, f"trainer.accelerator={accelerator}", f"optimizer.fused={setting}"])
        assert build_module(cfg, resolve_runtime(cfg)).hparams.optimizer["fused"] is fused, (accelerator, setting)
    cfg = compose_cfg([*TINY, "optimizer=sgd"])
    assert "fused" not in build_module(cfg, resolve_runtime(cfg)).hparams.optimizer


def test_progress_bar_reads_the_loss_only_every_log_every_n_steps(tiny_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the logged loss for the bar copies it to the host: on a GPU, a sync that drains the queue of
    kernels each step. The bar reads it at Lightning's logging cadence and at the epoch's end instead."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the Rich bar is for terminals
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.batch_size=4", "data.verify=false",
                       "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=3",
                       "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=1", f"run_dir={tmp_path}"])
    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime)
    trainer = build_trainer(cfg, tmp_path, [], runtime)
    bar = trainer.progress_bar_callback
    steps: list[int] = []
    read = bar.get_metrics
    bar.get_metrics = lambda trainer, module: steps.append(trainer.global_step) or read(trainer, module)
    trainer.fit(module, datamodule=build_datamodule(cfg, module, runtime))
    assert trainer.global_step == 7
    train_reads = [s for s in steps if s < 7]
    assert train_reads == [3, 6], steps  # after steps 3 and 6; then the epoch's end and validation
    assert "train/loss_step" in trainer.progress_bar_metrics
