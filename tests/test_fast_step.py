"""The training step's GPU fast paths that can be checked on a CPU: fused AdamW only where the weights are on CUDA,
and a progress bar that reads the step's loss (a host-device sync) only when it redraws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from carnet.errors import CarnetError
from carnet.training.builders import build_datamodule, build_module, build_trainer
from carnet.training.optim import resolve_fused
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": "auto"}


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_fused_auto_is_off_on_the_cpu(optimizer: str, tiny_data: Path, tmp_path: Path) -> None:
    """conf/optimizer's `fused: auto` reaches the optimizer of a real fit as a bool: False for CPU weights."""
    cfg = compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", f"optimizer={optimizer}", f"run_dir={tmp_path}"])
    assert cfg.optimizer.fused == "auto"
    module = build_module(cfg)
    trainer = build_trainer(cfg, tmp_path, [])
    trainer.fit(module, datamodule=build_datamodule(cfg, module))
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"] is False and [g["name"] for g in opt.param_groups] == ["head", "backbone"]


def test_fused_auto_is_on_for_cuda_weights() -> None:
    assert resolve_fused(ADAMW, torch.device("cuda", 0))["fused"] is True
    assert resolve_fused(ADAMW, torch.device("cpu"))["fused"] is False
    assert resolve_fused({**ADAMW, "fused": True}, torch.device("cpu"))["fused"] is True  # an explicit value stays
    sgd = {"_target_": "torch.optim.SGD", "lr": 0.1}
    assert resolve_fused(sgd, torch.device("cuda")) == sgd  # no key, no change
    with pytest.raises(CarnetError, match=r"optimizer\.fused='yes'"):
        resolve_fused({**ADAMW, "fused": "yes"}, torch.device("cpu"))


def test_progress_bar_reads_the_loss_only_every_log_every_n_steps(tiny_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the logged loss for the bar copies it to the host: on a GPU, a sync that drains the queue of
    kernels each step. The bar reads it at Lightning's logging cadence and at the epoch's end instead."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the Rich bar is for terminals
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.batch_size=4", "data.verify=false",
                       "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=3",
                       "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=1", f"run_dir={tmp_path}"])
    module = build_module(cfg)
    trainer = build_trainer(cfg, tmp_path, [])
    bar = trainer.progress_bar_callback
    steps: list[int] = []
    read = bar.get_metrics
    bar.get_metrics = lambda trainer, module: steps.append(trainer.global_step) or read(trainer, module)
    trainer.fit(module, datamodule=build_datamodule(cfg, module))
    assert trainer.global_step == 7
    train_reads = [s for s in steps if s < 7]
    assert train_reads == [3, 6], steps  # after steps 3 and 6; then the epoch's end and validation
    assert "train/loss_step" in trainer.progress_bar_metrics
