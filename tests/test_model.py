"""The classifier: heads, forward/backward, local weights loading, the checkpoint contract."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from carnet.errors import CheckpointError, WeightsError
from carnet.models.checkpoint import load_checkpoint, read_checkpoint
from carnet.models.network import create_backbone
from tests.helpers.recipe import classifier

HEADS = {
    "linear": {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.1},
    "mlp": {"_target_": "carnet.models.heads.MLPHead", "hidden_dim": 32, "dropout": 0.2},
}
NAMES = [f"car {k}" for k in range(10)]


@pytest.mark.parametrize("head", HEADS)
def test_forward_and_backward_with_each_head(head):
    module = classifier(class_names=NAMES, head=HEADS[head])
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)  # pixels: the net normalises
    labels = torch.tensor([0, 1, 2, 3])
    logits = module(images)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_weights_round_trip(tmp_path):
    """Weights saved in timm's key names (classifier included) load back into the headless backbone."""
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    for fmt in ("safetensors", "pth"):
        path = tmp_path / f"w.{fmt}"
        state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
        save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
        loaded = create_backbone("test_efficientnet", weights=str(path)).eval()
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded(images), source.eval().forward_head(source.forward_features(images),
                                                                              pre_logits=True))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    state = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    state.pop("conv_stem.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"conv_stem.weight.*extra.weight"):
        create_backbone("test_efficientnet", weights=str(path))
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("test_efficientnet", weights=str(tmp_path / "none.pth"))


def test_checkpoint_carries_everything_inference_needs(tmp_path):
    import pytorch_lightning as pl

    module = classifier(class_names=NAMES, head=HEADS["mlp"], image_size=72,
                        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    trainer = pl.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    net, meta = load_checkpoint(path)
    assert meta["class_names"] == NAMES and meta["image_size"] == 72
    assert meta["model_name"] == "test_efficientnet" and meta["head"]["_target_"] == "carnet.models.heads.MLPHead"
    assert meta["mean"] == list(module.data_config["mean"]) and meta["interpolation"] == "bicubic"
    module.eval()
    images = torch.randint(0, 256, (3, 3, 72, 72), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(net(images), module(images))


def test_unreadable_checkpoints_are_named(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.ckpt"):
        read_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a carnet checkpoint"):
        read_checkpoint(foreign)
