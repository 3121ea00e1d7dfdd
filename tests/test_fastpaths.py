"""Training fast paths: each is a config key whose default resolves right on the CPU and on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from carnet.runtime import resolve_runtime
from carnet.summary import RunSummary
from carnet.training.builders import build_datamodule, build_module, build_trainer
from carnet.training.run_dir import RunArtifacts
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.paths import CONF
from tests.helpers.recipe import classifier

HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0}


def test_defaults_in_conf() -> None:
    cfg = compose_cfg()
    assert cfg.trainer.precision == "auto" and cfg.trainer.benchmark is None
    assert cfg.trainer.accumulate_grad_batches == 1
    assert cfg.data.cache == "none"
    for path in sorted((CONF / "model").glob("*.yaml")):
        model = compose_cfg([f"model={path.stem}"]).model
        assert model.compile is False and model.channels_last == "auto", path.name


def test_trainer_on_this_cpu_gets_fp32_and_no_cudnn_benchmark(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "trainer.precision=auto"])  # trainer=cpu with the default precision
    trainer = build_trainer(cfg, tmp_path, [], resolve_runtime(cfg))
    assert trainer.precision == "32-true"
    assert torch.backends.cudnn.benchmark is False


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    plain = classifier(head=HEAD, channels_last=False).eval()
    fast = classifier(head=HEAD, channels_last=True).eval()
    fast.net.load_state_dict(plain.net.state_dict())
    assert fast.net.uses_channels_last() and not plain.net.uses_channels_last()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(plain(images), fast(images), atol=1e-4)


def test_compile_is_in_place_and_keeps_checkpoint_keys() -> None:
    plain = classifier(head=HEAD)
    compiled = classifier(head=HEAD, compile=True)
    assert compiled.net._compiled_call_impl is not None and plain.net._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no `_orig_mod.`: checkpoints stay portable
    assert compiled.hparams.compile is True


@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")  # no validation in this run, by design
def test_gradient_accumulation_steps_the_optimizer_less_often(tiny_data: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.verify=false", "trainer.accumulate_grad_batches=2",
                       "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0", "scheduler=none", "~logger"])
    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime)
    datamodule = build_datamodule(cfg, module, runtime)
    datamodule.setup("fit")
    batches = len(datamodule.train_dataloader())
    record = RunArtifacts(tmp_path, RunSummary(), monitor="val/loss", mode="min")
    trainer = build_trainer(cfg, tmp_path, [record], runtime)
    trainer.fit(module, datamodule=datamodule)
    assert batches >= 3
    assert trainer.global_step == math.ceil(batches / 2)  # a leftover odd batch steps at epoch end
