"""Shared fixtures: a tiny dataset in the Kaggle layout, Hydra composition, a real train.py subprocess and a tiny
checkpoint. Plain helpers (paths, overrides, compose_cfg, run_script, ...) are in tests/helpers."""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.runs import run_script

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where torch sees a CUDA device and skip elsewhere, saying why (`pytest -m gpu` selects them)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch  # only when a gpu test was collected

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False here)")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class synthetic dataset in the Kaggle layout: 4 train images per class, 6 test images."""
    from carnet.tools.demo import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "cars", per_class=4, test=6, seed=0)


@pytest.fixture
def cfg_factory() -> Callable[..., DictConfig]:
    return compose_cfg


@pytest.fixture
def train_run(tiny_data: Path, tmp_path: Path) -> Callable[..., tuple[Path, subprocess.CompletedProcess]]:
    """Run `train.py` on tiny_data with TINY settings plus overrides; return (run dir, process)."""

    def run(*overrides: str, run_dir: Path | None = None) -> tuple[Path, subprocess.CompletedProcess]:
        run_dir = run_dir or tmp_path / "run"
        proc = run_script("train.py", f"data.root={tiny_data}", *TINY, f"hydra.run.dir={run_dir}",
                          f"paths.output_dir={tmp_path / 'outputs'}", *overrides)
        return run_dir, proc

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real carnet checkpoint in seconds: test_efficientnet at 64 px after a 2-step Lightning fit.

    Two steps leave the backbone's pooled features almost the same for every picture, so the head is then
    redrawn and centred on the features of varied pictures: predictions spread over the classes, and a test
    comparing two code paths (server vs in-process, ONNX vs torch) notices a preprocessing mismatch instead of
    two flat outputs agreeing by accident.
    """
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers.recipe import classifier

    pl.seed_everything(0, verbose=False)
    module = classifier(class_names=[f"car {k}" for k in range(10)],
                        head={"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0},
                        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2}, scheduler=None,
                        label_smoothing=0.0)
    images = F.interpolate(torch.rand(32, 3, 4, 4) * 255, size=64, mode="bilinear")  # smooth colour fields, 0..255
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():  # no validation in these two steps, by design
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")
        trainer.fit(module, DataLoader(TensorDataset(images, torch.arange(32) % 10), batch_size=8))
    module.eval()
    with torch.no_grad():
        features = module.net.features(images)  # normalised as the network sees pixels
        linear = module.head[-1]
        linear.weight.copy_(torch.randn_like(linear.weight) / (features.std(0).norm() + 1e-8) * 3)
        linear.bias.copy_(-linear.weight @ features.mean(0))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported with carnet-export's code (uint8 input, the metadata inside the file)."""
    from carnet.inference.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_checkpoint, path, check=False)
    return path
