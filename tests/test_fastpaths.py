"""Training fast paths: each is a config key whose default resolves right on the CPU and on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from carnet.training.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    resolve_async_save,
    resolve_benchmark,
    resolve_compile,
    resolve_precision,
)
from carnet.training.module import CarClassifier
from carnet.training.run_dir import RunArtifacts
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.paths import CONF

HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0}


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> callable:
    """Make torch report a CUDA device (only the resolvers look; nothing runs on it)."""

    def make(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return make


def test_defaults_in_conf() -> None:
    cfg = compose_cfg()
    assert cfg.trainer.precision == "auto" and cfg.trainer.benchmark is None
    assert cfg.trainer.accumulate_grad_batches == 1
    assert cfg.data.cache == "none"
    for path in sorted((CONF / "model").glob("*.yaml")):
        model = compose_cfg([f"model={path.stem}"]).model
        assert model.compile is False and model.channels_last is False, path.name


def test_precision_resolves_per_device(fake_gpu: callable) -> None:
    assert resolve_precision("auto", "cpu") == "32"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"  # an explicit choice is kept
    fake_gpu(bf16=True)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32"  # trainer=cpu on a GPU machine
    fake_gpu(bf16=False)
    assert resolve_precision("auto", "gpu") == "16-mixed"


def test_benchmark_and_compile_resolve_per_device(fake_gpu: callable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA, on any machine
    assert resolve_benchmark(None, "auto") is False
    assert resolve_compile("auto", "auto") is False
    assert resolve_compile(False, "gpu") is False and resolve_compile(True, "cpu") is True
    assert resolve_benchmark(True, "cpu") is True and resolve_benchmark(False, "gpu") is False
    fake_gpu()
    assert resolve_benchmark(None, "auto") is True and resolve_benchmark(None, "cpu") is False
    assert resolve_compile("auto", "gpu") == "regional" and resolve_compile("auto", "cpu") is False
    with pytest.raises(ValueError, match=r"model\.compile='fast'"):
        resolve_compile("fast", "gpu")


def test_gpu_paths_not_yet_measured_on_a_gpu_are_opt_in(fake_gpu: callable) -> None:
    """On a CUDA machine the default config turns on only what was measured there (docs/performance.md, "Measured
    where"): bf16 and cudnn.benchmark, not GPU decoding, regional compile or background checkpoint writes."""
    import inspect

    from carnet.data.datamodule import CarDataModule

    cfg = compose_cfg()
    fake_gpu()
    accelerator = cfg.trainer.accelerator
    assert resolve_precision(cfg.trainer.precision, accelerator) == "bf16-mixed"
    assert resolve_benchmark(cfg.trainer.benchmark, accelerator) is True
    assert resolve_async_save(cfg.checkpoint.async_save, accelerator) is False
    assert resolve_compile(cfg.model.compile, accelerator) is False
    assert cfg.data.decode == "cpu" and inspect.signature(CarDataModule).parameters["decode"].default == "cpu"


def test_trainer_on_this_cpu_gets_fp32_and_no_cudnn_benchmark(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "trainer.precision=auto"])  # trainer=cpu with the default precision
    trainer = build_trainer(cfg, tmp_path, [])
    assert trainer.precision == "32-true"
    assert torch.backends.cudnn.benchmark is False


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    plain = CarClassifier("test_efficientnet", list("abc"), HEAD, image_size=64).eval()
    fast = CarClassifier("test_efficientnet", list("abc"), HEAD, image_size=64, channels_last=True).eval()
    fast.net.load_state_dict(plain.net.state_dict())
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(plain(images), fast(images), atol=1e-4)


def test_compile_is_in_place_and_keeps_checkpoint_keys() -> None:
    plain = CarClassifier("test_efficientnet", list("abc"), HEAD, image_size=64)
    compiled = CarClassifier("test_efficientnet", list("abc"), HEAD, image_size=64, compile=True)
    assert compiled.net._compiled_call_impl is not None and plain.net._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no `_orig_mod.`: checkpoints stay portable
    assert compiled.hparams.compile is True


@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")  # no validation in this run, by design
def test_gradient_accumulation_steps_the_optimizer_less_often(tiny_data: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.verify=false", "trainer.accumulate_grad_batches=2",
                       "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0", "scheduler=none", "~logger"])
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    datamodule.setup("fit")
    batches = len(datamodule.train_dataloader())
    trainer = build_trainer(cfg, tmp_path, [RunArtifacts(tmp_path, {})])
    trainer.fit(module, datamodule=datamodule)
    assert batches >= 3
    assert trainer.global_step == math.ceil(batches / 2)  # a leftover odd batch steps at epoch end
