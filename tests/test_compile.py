"""torch.compile made practical (issue 14 item 3): regional compilation, a persistent compile cache, and training that
stays right across an unfreeze (pytorch#139476).

Compiled code runs with the ``aot_eager`` backend here: it traces the graphs and builds AOTAutograd's joint
forward/backward (where the requires_grad caching of #139476 lives) without a C++ compiler; one slow test uses
inductor itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from carnet.models.checkpoint import load_checkpoint, read_checkpoint
from carnet.models.network import compile_regions, compile_status, use_compile_cache
from carnet.runtime import resolve_runtime
from carnet.training.builders import build_module
from carnet.training.finetune import ProgressiveUnfreezing, backbone_blocks, unfrozen_block_count
from carnet.training.module import CarClassifier
from tests.helpers import recipe
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY

HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 1e-2}
SCHEDULE = [[0, 0.0], [1, 0.5]]  # head only in epoch 0, then the last half of the backbone's blocks


pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test starts with no compiled code (as a new process would), whatever ran before it, and its own compile
    cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def classifier(compile_: Any = False, backend: Any = "aot_eager", model: str = "test_efficientnet",
               seed: int = 0) -> CarClassifier:
    pl.seed_everything(seed, verbose=False)
    return recipe.classifier(model_name=model, class_names=[f"car {k}" for k in range(4)], head=HEAD, image_size=32,
                             compile=compile_, compile_backend=backend, optimizer=ADAMW, scheduler=None)


def compiled_modules(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_regional_compiles_each_backbone_block_in_place() -> None:
    """model.compile=regional: every EfficientNet block is compiled in place (identical blocks share code), the
    normalisation, stem, head conv and head stay eager, and the state dict keeps its keys."""
    plain, regional = classifier(), classifier("regional")
    blocks = [f"net.backbone.blocks.{s}.{b}" for s, stage in enumerate(plain.backbone.blocks)
              for b in range(len(stage))]
    assert compiled_modules(regional) == blocks
    assert compiled_modules(classifier(True)) == ["net"]  # true: the whole network, as before
    assert list(regional.state_dict()) == list(plain.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    plain.eval(), regional.eval()
    with torch.no_grad():
        torch.testing.assert_close(regional(images), plain(images), rtol=1e-4, atol=1e-5)
    assert compile_status(regional.net) == "regional" and compile_status(plain.net) is None


def test_regional_falls_back_to_stages_or_the_whole_backbone() -> None:
    """Other timm layouts: ResNet's layerN blocks, ConvNeXt's stages, and a backbone without either as a whole."""
    import timm

    resnet = timm.create_model("resnet18", num_classes=0)
    assert compile_regions(resnet) == [*resnet.layer1, *resnet.layer2, *resnet.layer3, *resnet.layer4]
    convnext = timm.create_model("convnext_atto", num_classes=0)
    assert compile_regions(convnext) == list(convnext.stages)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert compile_regions(plain) == [plain]


def test_an_unknown_compile_backend_is_named() -> None:
    # model.compile=auto is resolved in carnet.runtime (tests/test_runtime.py), model.compile=fast refused by
    # carnet.config_check (tests/test_config_values.py).
    with pytest.raises(ValueError, match=r"model\.compile_backend='nope'"):
        recipe.classifier(compile="regional", compile_backend="nope")


def test_compile_cache_is_persistent_and_the_users_choice_wins(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """inductor's caches (FX graphs, AOTAutograd, Triton kernels) live under TORCHINDUCTOR_CACHE_DIR, by default in
    /tmp, which machines clear: carnet points it at ~/.cache/carnet/inductor unless the user chose a folder."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_compile_cache() == tmp_path / "xdg" / "carnet" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "carnet" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"  # the environment's, untouched
    assert use_compile_cache(tmp_path / "key") == tmp_path / "key"  # model.compile_cache=PATH names it outright
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "key")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "key")  # where inductor writes


def test_compiling_module_sets_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    classifier(False)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # eager runs leave the environment alone
    classifier("regional")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "carnet" / "inductor")


# ---------------------------------------------------------------------------------------------------------------
# Training with compiled blocks across an unfreeze


class Recorder(pl.Callback):
    """Per step: the loss, and which backbone parameters got a gradient; the backbone at the start of each epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.with_grad: list[set[str]] = []
        self.at_epoch_start: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_epoch_start.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.with_grad.append({n for n, p in pl_module.backbone.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module: CarClassifier, epochs: int = 2, steps: int = 2) -> tuple[Recorder, dict[str, torch.Tensor]]:
    """A real Lightning fit with carnet's unfreezing callback on smooth 0..255 pictures; (recorder, end weights)."""
    generator = torch.Generator().manual_seed(1)
    images = F.interpolate(torch.rand(8 * steps, 3, 4, 4, generator=generator) * 255, size=32, mode="bilinear")
    data = DataLoader(TensorDataset(images.round().to(torch.uint8), torch.arange(8 * steps) % 4), batch_size=8)
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=[ProgressiveUnfreezing(SCHEDULE, bn="frozen"), recorder])
    trainer.fit(module, data)
    return recorder, {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def half_of_the_backbone(module: CarClassifier) -> tuple[set[str], set[str]]:
    """(parameter names the schedule unfreezes at epoch 1, those that stay frozen), by timm's blocks."""
    blocks = backbone_blocks(module.backbone)
    keep = unfrozen_block_count(len(blocks), 0.5)
    params = {n for n, _ in module.backbone.named_parameters()}
    unfrozen = {n for block in blocks[len(blocks) - keep:] for n in block} & params
    return unfrozen, params - unfrozen


@pytest.mark.parametrize("compile_", ["regional", True])
def test_unfreezing_a_compiled_network_trains_the_new_blocks_and_nothing_else(compile_: Any) -> None:
    """(a) after the unfreeze at epoch 1 the newly trainable weights get gradients and move, (b) the still-frozen
    ones stay bit-identical all run long, (c) the losses equal an eager run's on the same seed."""
    eager_rec, eager_end = fit(classifier(False))
    compiled = classifier(compile_)
    rec, end = fit(compiled)
    unfrozen, frozen = half_of_the_backbone(compiled)
    assert unfrozen and frozen
    start, epoch1 = rec.at_epoch_start
    assert rec.with_grad[:2] == [set(), set()]  # epoch 0: the head only
    assert rec.with_grad[2:] == [unfrozen, unfrozen]  # (a) epoch 1: exactly the unfrozen half
    assert all(not torch.equal(epoch1[n], end[n]) for n in unfrozen)  # (a) ... and it trains
    assert all(torch.equal(start[n], end[n]) for n in frozen)  # (b) bit-identical
    torch.testing.assert_close(torch.tensor(rec.losses), torch.tensor(eager_rec.losses), rtol=1e-4, atol=1e-5)
    for name in eager_end:
        torch.testing.assert_close(end[name], eager_end[name], rtol=1e-3, atol=1e-5)


def test_an_unfreeze_drops_compiled_code_and_nothing_else_does() -> None:
    """pytorch#139476: up to torch 2.1x dynamo does not guard parameters' requires_grad, so a graph compiled while a
    block was frozen goes on treating it as frozen after an unfreeze (no gradient), or the reverse. The unfreezing
    callback therefore clears compiled code whenever the frozen set changes, and only then (a re-applied epoch
    keeps it)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    module = classifier("regional", backend=counter)
    module.train()
    callback = ProgressiveUnfreezing(SCHEDULE, bn="frozen")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def step() -> int:
        before = counter.frame_count
        module(images).sum().backward()
        return counter.frame_count - before

    callback.apply(module, 0)
    first = step()
    assert first > 0 and step() == 0
    callback.apply(module, 0)  # the same frozen set (every epoch start re-applies it): compiled code kept
    assert step() == 0
    callback.apply(module, 1)  # half unfrozen: every block compiles afresh, frozen ones too
    assert step() == first
    assert callback.apply(module, 1) == 0.5 and step() == 0


def test_checkpoint_of_a_compiled_run_loads_exports_and_predicts(tmp_path: Path) -> None:
    """A checkpoint written by a regionally compiled run is an ordinary one: load_checkpoint, TorchScript export."""
    from carnet.inference.export import export_torchscript

    module = classifier("regional")
    pl.seed_everything(0, verbose=False)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(images, torch.arange(8) % 4), batch_size=8))
    ckpt = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(ckpt)
    assert list(read_checkpoint(ckpt)["state_dict"]) == list(classifier().state_dict())  # no `_orig_mod.`
    net, _ = load_checkpoint(ckpt)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(images), module(images), rtol=1e-4, atol=1e-5)
    assert compile_status(net) is None  # predict and serve run the plain network
    export_torchscript(ckpt, tmp_path / "model.pt")
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), net(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_unfreezing_with_inductor_on_the_cpu() -> None:
    """The same run compiled by inductor itself (C++ kernels on the CPU): the unfreeze still trains the right half."""
    eager_rec, _ = fit(classifier(False))
    compiled = classifier("regional", backend="inductor")
    rec, end = fit(compiled)
    unfrozen, frozen = half_of_the_backbone(compiled)
    start = rec.at_epoch_start[0]
    assert rec.with_grad[2:] == [unfrozen, unfrozen]
    assert all(torch.equal(start[n], end[n]) for n in frozen)
    torch.testing.assert_close(torch.tensor(rec.losses), torch.tensor(eager_rec.losses), rtol=1e-3, atol=1e-4)


def test_the_run_config_reaches_the_compiled_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.compile_backend and model.compile_cache of a run's config are what build_module compiles with."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cfg = compose_cfg([*TINY, "model.compile=regional", "model.compile_backend=aot_eager",
                       f"model.compile_cache={tmp_path / 'cache'}"])
    module = build_module(cfg, resolve_runtime(cfg))
    assert module.hparams.compile_backend == "aot_eager"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
