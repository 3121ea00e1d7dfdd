"""Shared fixtures: a tiny dataset in the Kaggle layout, Hydra composition, and a real train.py subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Fast settings for real training runs in tests: tiny model, tiny images, CPU, no progress bar noise.
TINY = [
    "model=test_efficientnet",
    "model.pretrained=false",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "image_size=64",
    "data.batch_size=8",
    "data.num_workers=0",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class synthetic dataset in the Kaggle layout: 4 train images per class, 6 test images."""
    from carnet.tools.demo import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "cars", per_class=4, test=6, seed=0)


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/train.yaml with overrides, as `python train.py ...` would (Hydra compose API)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []), return_hydra_config=False)


@pytest.fixture
def cfg_factory() -> Callable[..., DictConfig]:
    return compose_cfg


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a top-level entry point (train.py, predict.py) in a fresh interpreter; fail with its output."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


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

    from carnet.training.module import CarClassifier

    pl.seed_everything(0, verbose=False)
    module = CarClassifier("test_efficientnet", [f"car {k}" for k in range(10)],
                           head={"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0}, image_size=64,
                           optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2})
    images = F.interpolate(torch.randn(32, 3, 4, 4), size=64, mode="bilinear")  # smooth colour fields
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(images, torch.arange(32) % 10), batch_size=8))
    module.eval()
    with torch.no_grad():
        features = module.backbone(images)
        linear = module.head[-1]
        linear.weight.copy_(torch.randn_like(linear.weight) / (features.std(0).norm() + 1e-8) * 3)
        linear.bias.copy_(-linear.weight @ features.mean(0))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
