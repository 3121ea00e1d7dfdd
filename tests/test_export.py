"""ONNX / TorchScript export: metadata, dynamic batch, agreement with torch, and serving the ONNX file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from carnet.errors import CheckpointError, ExportError
from carnet.inference.export import export_onnx
from carnet.inference.onnx_meta import META_KEY, add_onnx_meta, read_onnx_meta
from carnet.models.checkpoint import CHECKPOINT_KEY, load_checkpoint
from carnet.serving.app import create_app
from carnet.serving.backends import ModelLoadError
from carnet.serving.classifier import Classifier
from tests.helpers.images import photo
from tests.helpers.reference import eval_batch


@pytest.fixture(scope="module")
def onnx_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(tiny_checkpoint, out)
    assert result["max_abs_diff"] < 1e-4
    return out


def test_onnx_metadata_is_the_checkpoints(onnx_file: Path, tiny_checkpoint: Path) -> None:
    assert META_KEY == CHECKPOINT_KEY  # onnx_meta spells the key out: importing the checkpoint module imports torch
    _, meta = load_checkpoint(tiny_checkpoint)
    assert read_onnx_meta(onnx_file) == {**meta, "input_dtype": "uint8"}  # the graph normalises uint8 pixels
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    stored = json.loads(props["carnet"])
    for key in ("image_size", "mean", "std", "interpolation", "crop_pct", "class_names", "model_name"):
        assert stored[key] == meta[key] == json.loads(props[key])
    assert json.loads(props["input_dtype"]) == "uint8"


def test_onnx_matches_torch_on_images_with_dynamic_batch(onnx_file: Path, tiny_checkpoint: Path) -> None:
    net, meta = load_checkpoint(tiny_checkpoint)
    batch = eval_batch(meta, [photo(s) for s in range(5)])
    with torch.no_grad():
        expected = torch.softmax(net(batch).double(), 1).numpy()
    assert batch.dtype == torch.uint8  # pixels: the exported graph normalises them as the network does
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "logits"
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for chunk in (slice(0, 1), slice(0, 5), slice(1, 4)):  # batch sizes 1, 5 and 3 from one file
        logits = torch.from_numpy(session.run(None, {"images": batch[chunk].numpy()})[0]).double()
        np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), expected[chunk], atol=1e-4, rtol=0)


def test_served_onnx_equals_served_torch(onnx_file: Path, tiny_checkpoint: Path) -> None:
    torch_client = create_app(tiny_checkpoint, top_k=10).test_client()
    onnx_client = create_app(onnx_file, backend="onnx", top_k=10).test_client()
    health = onnx_client.get("/health").get_json()
    assert health["backend"] == "onnx" and health["model"] == "test_efficientnet" and health["num_classes"] == 10
    for seed in range(3):
        data = photo(seed)
        a = torch_client.post("/predict", data=data, content_type="image/jpeg").get_json()
        b = onnx_client.post("/predict", data=data, content_type="image/jpeg").get_json()
        assert b["class_id"] == a["class_id"]
        pa = {k["class_id"]: k["probability"] for k in a["top_k"]}
        pb = {k["class_id"]: k["probability"] for k in b["top_k"]}
        assert [pb[k] for k in range(10)] == pytest.approx([pa[k] for k in range(10)], abs=1e-4)
    assert onnx_client.post("/predict", data=b"nope", content_type="image/jpeg").status_code == 400


def test_onnx_of_normalised_float_input_is_still_served(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A file exported before the graph took uint8 pixels (float32 normalised input, no ``input_dtype``): the ONNX
    backend normalises for it, and serves what the checkpoint serves."""
    net, meta = load_checkpoint(tiny_checkpoint)
    old = tmp_path / "old.onnx"
    size = meta["image_size"]
    body = torch.nn.Sequential(net.backbone, net.head).eval()  # the network as it was: no normalisation
    torch.onnx.export(body, (torch.randn(1, 3, size, size),), str(old), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    model = onnx.load(str(old))
    add_onnx_meta(model, meta)
    onnx.save(model, str(old))
    assert "input_dtype" not in read_onnx_meta(old)
    image = np.asarray(Image.open(io.BytesIO(photo(5))).convert("RGB"))
    expected = Classifier(tiny_checkpoint).predict_proba(image)
    np.testing.assert_allclose(Classifier(old, backend="onnx").predict_proba(image), expected, atol=1e-4, rtol=0)


def test_onnx_without_carnet_metadata_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_file))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ExportError, match=r"bare\.onnx has no 'carnet' metadata"):
        read_onnx_meta(bare)
    with pytest.raises(ModelLoadError, match=r"bare\.onnx has no 'carnet' metadata") as refused:
        create_app(bare, backend="onnx")  # one error type for a model the app cannot load (gunicorn: one line)
    assert isinstance(refused.value.__cause__, ExportError)


def test_failed_export_writes_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(CheckpointError, match=r"bogus\.ckpt is not a carnet checkpoint"):
        export_onnx(bogus, out)
    assert not out.exists()


def test_export_cli_writes_onnx_and_torchscript(tiny_checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from carnet.inference.export import main

    out, ts = tmp_path / "m.onnx", tmp_path / "m.pt"
    main(["--ckpt", str(tiny_checkpoint), "--out", str(out), "--torchscript", str(ts)])  # carnet-export
    stdout = capsys.readouterr().out
    assert "onnxruntime vs torch max |dp|" in stdout and f"wrote {ts}" in stdout
    assert read_onnx_meta(out)["model_name"] == "test_efficientnet"
    files = {"carnet.json": ""}
    scripted = torch.jit.load(str(ts), map_location="cpu", _extra_files=files)
    assert json.loads(files["carnet.json"])["class_names"] == [f"car {k}" for k in range(10)]
    net, meta = load_checkpoint(tiny_checkpoint)
    batch = eval_batch(meta, [photo(7), photo(8)])
    with torch.no_grad():
        torch.testing.assert_close(scripted(batch), net(batch), atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed or removed



def test_export_cli_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from carnet.inference.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2 and "nope.ckpt not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(("flag", "example"), [("--out", "model.onnx"), ("--torchscript", "model.pt")])
def test_export_cli_refuses_a_folder_for_a_file(flag: str, example: str, tiny_checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """A folder for --out ended in "[Errno 21] Is a directory: '.out.iza5z27v.tmp' -> 'out'", naming a temporary
    file the user never made."""
    from carnet.inference.export import main

    folder = tmp_path / "exports"
    folder.mkdir()
    args = {"--out": str(tmp_path / "model.onnx"), flag: str(folder)}
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tiny_checkpoint), *(part for item in args.items() for part in item)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"carnet-export: error: {flag} {folder} is a folder; expected a file name, e.g. {folder / example}")
    assert list(folder.iterdir()) == [] and not (tmp_path / "model.onnx").exists()


def test_export_cli_takes_the_opsets_torch_writes(tiny_checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """``--opset 3`` was torch's 200-line traceback; carnet's range is torch's own (a torch that changes it fails
    here first)."""
    from torch.onnx import _constants

    from carnet.inference.export import OPSETS, main

    assert (OPSETS[0], OPSETS[-1]) == (_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "model.onnx"), "--opset", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "carnet-export: error: --opset 3: expected 7-20, the opsets torch's exporter writes")
    assert not (tmp_path / "model.onnx").exists()
