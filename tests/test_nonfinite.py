"""A run whose loss or weights stop being finite fails as such, and no entry point uses non-finite weights
(issue 18, item 1): a learning rate far too high used to end `completed`, with a best.ckpt of NaN that predicted
class 0 for every photo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carnet.errors import CarnetError, CheckpointError
from carnet.inference.export import main as export_main
from carnet.models.checkpoint import load_checkpoint, nonfinite_tensors, read_checkpoint
from carnet.serving.app import main as serve_main
from carnet.summary import read_summary
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY
from tests.helpers.paths import REPO
from tests.helpers.runs import child_env


def test_a_diverging_run_fails_in_one_line_and_saves_no_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"data.root={tiny_data}", *TINY,
                           "trainer.max_epochs=2", "optimizer.lr=1e6", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: training diverged:") and "epoch 1" in last, proc.stderr
    assert "optimizer.lr=1e+06 now" in last and "Traceback" not in proc.stderr
    summary = read_summary(run_dir)
    assert summary.status == "failed" and "training diverged" in summary.error
    assert summary.best_checkpoint is None  # no file to point at
    assert not (run_dir / "checkpoints").exists()


def test_weights_gone_nan_are_never_saved(tiny_data: Path, tmp_path: Path) -> None:
    """Epoch 2's weights turn NaN while its training losses were finite: the run fails before writing them, and
    best.ckpt and last.ckpt stay epoch 1's (Lightning's epoch 0, as the checkpoint counts)."""
    run_dir = tmp_path / "run"
    poison = "+callbacks.poison={_target_: tests.helpers.faults.PoisonWeights, epoch: 1}"
    with pytest.raises(CarnetError, match=r"1 weight tensor\(s\) hold NaN or infinity after epoch 2 "):
        train(compose_cfg([*ONE_BATCH, f"data.root={tiny_data}", "trainer.max_epochs=3", poison,
                           f"run_dir={run_dir}"]))
    summary = read_summary(run_dir)
    assert summary.status == "failed" and summary.best_epoch == 1
    for name in ("best.ckpt", "last.ckpt"):
        assert read_checkpoint(run_dir / "checkpoints" / name)["epoch"] == 0  # finite, or read_checkpoint refuses
    assert summary.best_checkpoint == str(run_dir / "checkpoints" / "best.ckpt")


def test_only_tensors_holding_nan_or_infinity_are_named() -> None:
    """Found by their sums (cheap), without a false alarm where a sum of finite values overflows."""
    state = {"overflowing_sum": torch.full((10,), 3e38), "half": torch.full((70_000,), 6e4, dtype=torch.float16),
             "nan": torch.tensor([0.0, float("nan")]), "inf": torch.tensor([float("-inf"), 1.0]),
             "num_batches_tracked": torch.tensor(3), "plus_and_minus_inf": torch.tensor([float("inf"), float("-inf")])}
    assert nonfinite_tensors(state) == ["nan", "inf", "plus_and_minus_inf"]


@pytest.fixture
def nan_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint with one NaN in its classifier: what a diverged run used to save as best.ckpt."""
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.startswith("net.head") and k.endswith("weight"))
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    path = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, path)
    return path


def test_predict_serve_and_export_refuse_a_non_finite_checkpoint(nan_checkpoint: Path, tiny_data: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CheckpointError, match=r"diverged\.ckpt holds NaN or infinite weights in 1 tensor"):
        load_checkpoint(nan_checkpoint)
    out = tmp_path / "predictions.csv"
    proc = subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt={nan_checkpoint}",
                           f"images={tiny_data / 'test_upload'}", f"out={out}", "data.num_workers=0"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.strip().startswith("predict: error: checkpoint") and len(proc.stderr.strip().splitlines()) == 1
    assert "NaN or infinite weights" in proc.stderr
    for command, args in ((export_main, ["--out", str(tmp_path / "model.onnx")]), (serve_main, ["--port", "0"])):
        with pytest.raises(SystemExit) as stopped:
            command(["--ckpt", str(nan_checkpoint), *args])
        assert stopped.value.code != 0
        assert "NaN or infinite weights" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()
