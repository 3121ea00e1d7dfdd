"""Every option of every config group composes (Hydra compose API) and builds its objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from carnet.runtime import resolve_runtime
from carnet.tools.demo import CLASS_NAMES
from carnet.training.builders import build_datamodule, build_module, build_trainer
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.paths import CONF
from tests.helpers.reference import reference_logits


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))  # _base: shared keys


def test_defaults_compose_to_the_competition():
    """The default classes are the competition's, in its category order: the ones carnet-demo draws (its
    train/<k>/ is class k), so demo runs, their checkpoints and data.extra label maps name classes alike."""
    assert list(compose_cfg().data.class_names) == CLASS_NAMES


@pytest.mark.parametrize("size", [224, 300, 448, 528, 97])
def test_image_size_is_a_plain_value_that_augmentation_follows(size):
    """The one knob: the data module built from the config trains and evaluates on size x size images."""
    cfg = compose_cfg([*TINY, f"image_size={size}"])
    runtime = resolve_runtime(cfg)
    datamodule = build_datamodule(cfg, build_module(cfg, runtime), runtime)
    image = np.random.default_rng(size).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for transform in (datamodule.train_transform(), datamodule.eval_transform()):
        assert transform(image=image)["image"].shape == (3, size, size)
    assert "image_size" not in cfg.data  # one knob


@pytest.mark.parametrize("name", options("model"))
def test_every_model_option_composes(name):
    cfg = compose_cfg([f"model={name}"])
    assert {"name", "pretrained", "weights", "drop_rate", "drop_path_rate", "channels_last"} <= set(cfg.model)


@pytest.mark.parametrize("head", options("head"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_heads_and_optimizers_build(head, optimizer):
    cfg = compose_cfg([*TINY, f"head={head}", f"optimizer={optimizer}", "scheduler=none"])
    module = build_module(cfg, resolve_runtime(cfg))
    opt = instantiate(module.hparams.optimizer)(module.param_groups())
    assert [g["name"] for g in opt.param_groups] == ["head", "backbone"]
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * cfg.backbone_lr_mult)


@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_scheduler_builds_and_steps(scheduler):
    cfg = compose_cfg([*TINY, f"scheduler={scheduler}"])
    module = build_module(cfg, resolve_runtime(cfg))
    opt = instantiate(module.hparams.optimizer)(module.param_groups())
    config = instantiate(module.hparams.scheduler)(opt, total_steps=20, steps_per_epoch=5)
    if scheduler == "none":
        assert config is None
        return
    sched = config["scheduler"]
    for _ in range(3):
        opt.step()
        sched.step(0.5) if scheduler == "plateau" else sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(lr > 0 for lr in lrs)
    # Every schedule scales the groups alike: the backbone stays at backbone_lr_mult x the head.
    assert lrs[1] == pytest.approx(lrs[0] * cfg.backbone_lr_mult, rel=1e-6)


@pytest.mark.parametrize("augment", options("augment"))
def test_every_augment_builds_a_training_pipeline(augment, tiny_data):
    cfg = compose_cfg([*TINY, f"augment={augment}", f"data.root={tiny_data}"])
    runtime = resolve_runtime(cfg)
    datamodule = build_datamodule(cfg, build_module(cfg, runtime), runtime)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8  # the network normalises on its device
    assert labels.dtype == torch.int64


@pytest.mark.parametrize("trainer", [pytest.param(t, marks=pytest.mark.gpu) if t == "gpu" else t
                                     for t in options("trainer")])
def test_every_trainer_option_builds(trainer, tmp_path):
    cfg = compose_cfg([*TINY, f"trainer={trainer}"])
    built = build_trainer(cfg, tmp_path, [], resolve_runtime(cfg))
    # carnet's checkpoints, whatever the option: best.ckpt (on a monitored metric) and last.ckpt (every epoch)
    assert [(c.filename, c.monitor is not None) for c in built.checkpoint_callbacks] == [("best", True),
                                                                                         ("last", False)]
    assert {Path(c.dirpath) for c in built.checkpoint_callbacks} == {(tmp_path / "checkpoints").resolve()}


def test_normalisation_comes_from_the_model(tiny_data):
    """The loaders hand over uint8 pixels and the network normalises them with its own timm mean and std: a batch
    of the datamodule built from the config gives the logits of that batch normalised by hand (lite0: 0.5, not
    ImageNet's), with any other statistics it would not."""
    import timm

    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "model=tf_efficientnet_lite0", "data.verify=false"])
    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime).eval()
    datamodule = build_datamodule(cfg, module, runtime)
    datamodule.setup("fit")
    images, _ = next(iter(datamodule.val_dataloader()))
    assert images.dtype == torch.uint8  # no normalisation in the loader
    lite0 = timm.get_pretrained_cfg("tf_efficientnet_lite0")
    meta = {"mean": lite0.mean, "std": lite0.std}
    assert meta["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        logits = module(images)
    torch.testing.assert_close(logits, reference_logits(module.net, images, meta), rtol=1e-4, atol=1e-4)
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert not torch.allclose(logits, reference_logits(module.net, images, imagenet), rtol=1e-4, atol=1e-4)


def test_config_is_plain_yaml_after_resolution():
    cfg = compose_cfg(["augment=heavy", "image_size=300"])
    text = OmegaConf.to_yaml(cfg, resolve=True)  # as train() writes the run's config.yaml
    assert yaml.safe_load(text)["augment"]["train"][0]["size"] == [300, 300] and "${" not in text
