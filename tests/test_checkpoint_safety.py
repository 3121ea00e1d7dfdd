"""A checkpoint that someone hands us is read without running any code in it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from carnet.errors import CarnetError, CheckpointError, WeightsError
from carnet.models.checkpoint import load_checkpoint, read_checkpoint
from carnet.models.network import create_backbone
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


class Payload:
    """What a malicious pickle does: call something while being loaded (here: create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "carnet": {"model_name": "test_efficientnet"}, "x": Payload(marker)}, evil)
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"evil\.ckpt holds Python objects .* refuses to unpickle"):
            load(evil)
    assert not marker.exists()


def test_carnet_checkpoints_load_with_weights_only(tiny_checkpoint: Path) -> None:
    checkpoint = read_checkpoint(tiny_checkpoint)
    assert "state_dict" in checkpoint and checkpoint["carnet"]["class_names"]


def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Files handed over as checkpoints: one that would run code, random bytes, a checkpoint cut short."""
    files = {"evil": tmp_path / "evil.ckpt", "random": tmp_path / "random.ckpt", "cut": tmp_path / "cut.ckpt"}
    torch.save({"state_dict": {}, "carnet": {}, "x": Payload(tmp_path / "it-ran")}, files["evil"])
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "carnet": {}}, files["cut"])
    files["cut"].write_bytes(files["cut"].read_bytes()[:500])
    return files


REFUSED = ("holds Python objects beyond tensors and plain values (posix.mkdir); carnet refuses to unpickle them, "
           "since loading could run code")
UNREADABLE = "is not a checkpoint carnet can read: not a file written by torch.save, or a truncated or damaged one"


def test_refused_pickles_and_unreadable_files_are_told_apart_in_one_line(tiny_data: Path, tmp_path: Path) -> None:
    """Random bytes are not "Python objects that could run code", and resume= says either in one line (it printed
    torch's six lines of weights_only advice)."""
    files = _not_checkpoints(tmp_path)
    for name, expected in (("evil", REFUSED), ("random", UNREADABLE), ("cut", UNREADABLE)):
        path = files[name]
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert str(err.value) == f"checkpoint {path} {expected}"
        cfg = compose_cfg([*TINY, f"data.root={tiny_data}", f"resume={path}", f"run_dir={tmp_path / name}"])
        with pytest.raises(CarnetError) as err:
            train(cfg)
        assert str(err.value) == f"resume={path} {expected}"
    assert not (tmp_path / "it-ran").exists()


def test_resume_of_another_class_count_is_one_line_before_building(tiny_checkpoint: Path, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    """A last.ckpt of 3 classes resumed on 10: Lightning's state_dict size-mismatch traceback came after the model
    and the data were built; now one line, before."""
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("net.head.") and value.shape[0] == 10:
            checkpoint["state_dict"][key] = value[:3].clone()
    checkpoint["carnet"]["class_names"] = ["a", "b", "c"]
    three = tmp_path / "three.ckpt"
    torch.save(checkpoint, three)
    run_dir = tmp_path / "run"
    with pytest.raises(CarnetError) as err:
        train(compose_cfg([*TINY, f"data.root={tiny_data}", f"resume={three}", f"run_dir={run_dir}"]))
    assert str(err.value) == (f"resume={three} does not fit this run: the checkpoint has 3 classes, this run has 10 "
                              "(data.class_names)")
    assert not (run_dir / "split.csv").exists()  # refused before the data was split


@pytest.mark.parametrize("entry", ["carnet.inference.export", "carnet.serving.app"])
def test_export_and_serve_name_an_unknown_timm_model_in_one_line(entry: str, tiny_checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """carnet-export and carnet-serve with the checkpoint of a model this timm does not know: one line naming the
    file and the model (24 and 38 lines of traceback before; predict already said it in one line)."""
    import importlib

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["carnet"]["model_name"] = "efficientnet_b99_nope"
    unknown = tmp_path / "unknown.ckpt"
    torch.save(checkpoint, unknown)
    args = ["--ckpt", str(unknown)] + (["--out", str(tmp_path / "m.onnx")] if entry.endswith("export") else [])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(entry).main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "\n" not in err, err
    assert f"checkpoint {unknown} was trained with model 'efficientnet_b99_nope', which timm" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_weights_file_that_is_no_state_dict_is_one_line_naming_it(tmp_path: Path) -> None:
    """``model.weights=`` a file that holds no state dict ended in a 50-line traceback: torch's UnpicklingError for
    random bytes or a pickle with code (refused, never run), safetensors' header error, an AttributeError for a
    saved tensor."""
    marker = tmp_path / "it-ran"
    files = {"random.pth": "is not a weights file carnet can read: not a file written by torch.save",
             "random.safetensors": "is not a safetensors file carnet can read (",
             "tensor.pth": "holds a Tensor, not a state dict: expected parameter names mapped to tensors",
             "evil.pth": "holds Python objects beyond tensors and plain values (posix.mkdir); carnet refuses"}
    noise = np.random.default_rng(0).bytes(4096)
    (tmp_path / "random.pth").write_bytes(noise)
    (tmp_path / "random.safetensors").write_bytes(noise)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"conv_stem.weight": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pth")
    for name, message in files.items():
        path = tmp_path / name
        with pytest.raises(WeightsError) as err:
            create_backbone("test_efficientnet", weights=str(path))
        assert str(err.value).startswith(f"model.weights={path} {message}") and "\n" not in str(err.value), name
    assert not marker.exists()
