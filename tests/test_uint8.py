"""uint8 batches: loaders hand over pixels, the network normalises them on its device, and training, predict,
TTA, serving and the exported files all take the same input (checked against the old float pipeline, by hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carnet.inference.ensemble import Model
from carnet.inference.export import export_onnx, export_torchscript
from carnet.inference.runner import Runner
from carnet.inference.selection import Images
from carnet.inference.tta import TTA, View
from carnet.models.checkpoint import load_checkpoint
from carnet.runtime import resolve_runtime
from carnet.serving.classifier import Classifier
from carnet.training.builders import build_datamodule, build_module
from tests.helpers.config import compose_cfg
from tests.helpers.images import photo
from tests.helpers.overrides import TINY
from tests.helpers.recipe import classifier
from tests.helpers.reference import eval_batch, normalise, reference_logits

HEAD = {"_target_": "carnet.models.heads.LinearHead", "dropout": 0.0}


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_loader_batches_are_uint8_pixels(tiny_data: Path) -> None:
    """Training (augmented), validation and head-fit feature batches: uint8 (N, 3, S, S), no float on the CPU."""
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.verify=false", "augment=light"])
    runtime = resolve_runtime(cfg)
    datamodule = build_datamodule(cfg, build_module(cfg, runtime), runtime)
    datamodule.setup("fit")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(),
                   datamodule.feature_loader(augmented=True)):
        images, labels = next(iter(loader))
        assert images.dtype == torch.uint8 and images.shape == (len(labels), 3, 64, 64)
        assert images.float().std() > 10  # real pixels, not a constant or 0..1 values


def test_network_on_uint8_equals_the_float_path() -> None:
    """net(uint8) = backbone + head on pixels normalised by hand with the model's mean/std; float 0..255 too."""
    module = classifier(class_names=list("abcd"), head=HEAD).eval()
    meta, batch = module.inference_meta(), pixels(3, 64)
    expected = reference_logits(module.net, batch, meta)
    floats = batch.float()
    with torch.no_grad():
        got, from_float = module(batch), module(floats)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_float, got)
    assert torch.equal(floats, batch.float())  # a float input is not normalised in place
    assert not any("normalize" in key for key in module.state_dict())  # checkpoint keys unchanged


def test_normalisation_follows_memory_format_and_autocast() -> None:
    plain = classifier(class_names=list("abc"), head=HEAD, channels_last=False).eval()
    fast = classifier(class_names=list("abc"), head=HEAD, channels_last=True).eval()
    fast.net.load_state_dict(plain.net.state_dict())
    batch = pixels(2, 64)
    assert fast.net.uses_channels_last() and not plain.net.uses_channels_last()
    x = fast.net.normalize(batch, fast.net.uses_channels_last())
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    torch.testing.assert_close(x, normalise(batch, plain.inference_meta()), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.net.normalize(batch).dtype == torch.bfloat16  # the run's precision, as the stem would cast
    with torch.no_grad():
        torch.testing.assert_close(fast(batch), plain(batch), atol=1e-4, rtol=1e-4)


def test_zoom_view_on_pixels_equals_the_view_on_normalised_input(tiny_checkpoint: Path) -> None:
    """TTA views resample the pixels (as float 0..255); normalising is affine per channel, so this is the old
    result of resampling the normalised batch."""
    net, meta = load_checkpoint(tiny_checkpoint)
    batch, view = pixels(2, 64, seed=1), View("zoom", zoom=1.3, hflip=True)
    out = view(batch)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    with torch.no_grad():
        expected = net.head(net.backbone(view(normalise(batch, meta))))
        torch.testing.assert_close(net(out), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("uint8_export")
    export_onnx(tiny_checkpoint, out / "model.onnx")
    export_torchscript(tiny_checkpoint, out / "model.pt")
    return out / "model.onnx", out / "model.pt"


def test_predict_serve_and_export_agree_on_one_image(tiny_checkpoint: Path, exported: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """One photo through predict's runner, the service (torch and ONNX backends) and the TorchScript file: the
    same probabilities as the reference float pipeline."""
    onnx_file, script_file = exported
    data = photo(11, size=(150, 100))
    (tmp_path / "a.jpg").write_bytes(data)
    net, meta = load_checkpoint(tiny_checkpoint)
    batch = eval_batch(meta, [data])
    assert batch.dtype == torch.uint8
    expected = reference_logits(net, batch, meta).double().softmax(-1)[0].numpy()

    runner = Runner(device="cpu", batch_size=32, num_workers=0, channels_last=True, amp=False, draft=False)
    images = Images(tmp_path, ["a.jpg"], ["a"], [-1])
    predicted = runner.view_probs(Model(tiny_checkpoint, net, meta), images, TTA())[0, 0].double().numpy()
    image = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    served = {name: Classifier(path, backend=name).predict_proba(image)
              for name, path in (("torch", tiny_checkpoint), ("onnx", onnx_file))}
    with torch.no_grad():
        scripted = torch.jit.load(str(script_file)).eval()(batch).double().softmax(-1)[0].numpy()
    assert expected.max() - expected.min() > 0.05  # the outputs differ by class: agreement is not by accident
    for name, probs in {"predict": predicted, **served, "torchscript": scripted}.items():
        np.testing.assert_allclose(probs, expected, atol=1e-4, rtol=0, err_msg=name)


def test_runner_zoom_tta_on_pixels(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A resampling TTA view through predict's runner equals the view applied to the hand-normalised batch."""
    data = photo(12)
    (tmp_path / "a.jpg").write_bytes(data)
    net, meta = load_checkpoint(tiny_checkpoint)
    batch, view = eval_batch(meta, [data]), View("zoom", zoom=1.15)
    with torch.no_grad():
        expected = net.head(net.backbone(view(normalise(batch, meta)))).softmax(-1)
    runner = Runner(device="cpu", batch_size=32, num_workers=0, channels_last=True, amp=False, draft=False)
    got = runner.view_probs(Model(tiny_checkpoint, net, meta), Images(tmp_path, ["a.jpg"], ["a"], [-1]), TTA((view,)))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)
