"""Phases: hand-off through ${paths.phases}, errors for missing/mismatching predecessors, resume mid-schedule,
the joined pipeline curves (carnet/phases.py, carnet/pipeline.py, conf/phase)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from carnet.artifacts import read_summary
from carnet.training.builders import build_module
from carnet.training.phases import Phase, PhaseError, join_phases, write_pipeline_report
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.paths import REPO
from tests.helpers.runs import run_script


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The network's parameters (no BatchNorm buffers) of a carnet checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in checkpoint["state_dict"].items() if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked"))}


def run_two_phases(root: Path, tiny_data: Path, via_train_py: bool) -> dict[str, Path]:
    """`phase=head`, then `phase=unfreeze_half optimizer.lr=0` (so that it ends exactly where it started)."""
    common = [f"data.root={tiny_data}", *ONE_BATCH, f"paths.output_dir={root / 'outputs'}"]
    runs = {"head": ["phase=head", "optimizer.lr=0.05"], "half": ["phase=unfreeze_half", "optimizer.lr=0"]}
    for name, overrides in runs.items():
        if via_train_py:
            run_script("train.py", *common, *overrides, f"hydra.run.dir={root / name}")
        else:  # the same train() that train.py calls, without a new interpreter (fast tests)
            train(compose_cfg([*common, *overrides, f"run_dir={root / name}"]))
    return {"head": root / "head", "half": root / "half", "phases": root / "outputs" / "phases", "root": root}


@pytest.fixture(scope="module")
def two_phases(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_two_phases(tmp_path_factory.mktemp("phases"), tiny_data, via_train_py=False)


def check_second_phase_started_from_first(runs: dict[str, Path]) -> None:
    head_ckpt = runs["phases"] / "head.ckpt"
    assert head_ckpt.read_bytes() == (runs["head"] / "checkpoints" / "best.ckpt").read_bytes()
    handed = weights(head_ckpt)
    # unfreeze_half ran at LR 0: its weights are exactly the ones it started from, i.e. the head phase's best.
    after = weights(runs["half"] / "checkpoints" / "last.ckpt")
    assert handed.keys() == after.keys()
    assert all(torch.equal(handed[k], after[k]) for k in handed)
    # ... and not what a fresh start would have had: the head phase changed the head.
    cfg = compose_cfg(["model=test_efficientnet", "model.pretrained=false"])
    pl.seed_everything(cfg.seed, workers=True)
    fresh = build_module(cfg).state_dict()
    assert not torch.equal(fresh["net.head.1.weight"], handed["net.head.1.weight"])
    assert all(torch.equal(fresh[k], handed[k]) for k in handed if k.startswith("net.backbone."))  # frozen in head

    head, half = read_summary(runs["head"]), read_summary(runs["half"])
    assert (head["phase"], head["init_from"], head["unfrozen_fraction"]) == ("head", None, 0.0)
    assert head["trainable_params"] == sum(v.numel() for k, v in handed.items() if k.startswith("net.head."))
    assert (half["phase"], half["init_from"], half["unfrozen_fraction"]) == ("unfreeze_half", str(head_ckpt), 0.5)
    assert head["trainable_params"] < half["trainable_params"] < half["total_params"]
    assert (runs["phases"] / "unfreeze_half.ckpt").is_file()
    assert (runs["half"] / "curves.png").is_file()


def test_second_phase_starts_from_first_phases_weights(two_phases: dict[str, Path]) -> None:
    check_second_phase_started_from_first(two_phases)


@pytest.mark.slow
def test_train_py_head_then_unfreeze_half(tiny_data: Path, tmp_path: Path) -> None:
    check_second_phase_started_from_first(run_two_phases(tmp_path, tiny_data, via_train_py=True))


def test_missing_predecessor_says_which_command_to_run(tmp_path: Path) -> None:
    cfg = compose_cfg(["phase=unfreeze_3q", f"paths.output_dir={tmp_path}"])
    with pytest.raises(PhaseError, match=r"unfreeze_half\.ckpt not found.*python train\.py phase=unfreeze_half"):
        Phase.from_config(cfg)
    with pytest.raises(PhaseError, match=r"nope\.ckpt not found"):
        Phase.from_config(compose_cfg(["phase=unfreeze_3q", f"init_from={tmp_path / 'nope.ckpt'}"]))


def test_mismatching_predecessor_names_both_sides(two_phases: dict[str, Path]) -> None:
    base = ["phase=unfreeze_half", f"paths.output_dir={two_phases['root'] / 'outputs'}"]
    assert Phase.from_config(compose_cfg([*base, "model=test_efficientnet"])) is not None
    with pytest.raises(PhaseError, match="model is test_efficientnet, this run's model is tf_efficientnet_lite0"):
        Phase.from_config(compose_cfg([*base, "model=tf_efficientnet_lite0"]))
    with pytest.raises(PhaseError, match=r"head is \{.*LinearHead.*\}, this run's head is \{.*MLPHead"):
        Phase.from_config(compose_cfg([*base, "model=test_efficientnet", "head=mlp"]))
    with pytest.raises(PhaseError, match="checkpoint has 10 classes, this run has 3"):
        Phase.from_config(compose_cfg([*base, "model=test_efficientnet", "data.class_names=[a,b,c]"]))


def test_resume_mid_progressive_restores_frozen_set_and_optimizer_groups(tiny_data: Path, tmp_path: Path) -> None:
    """Killed after 2 of 3 epochs, resumed from last.ckpt: same end state as an uninterrupted run."""
    common = [*ONE_BATCH, f"data.root={tiny_data}", "image_size=32", "phase=progressive",
              "unfreeze=[[0,0.0],[1,0.5],[4,1.0]]", f"paths.output_dir={tmp_path / 'outputs'}"]
    train(compose_cfg([*common, "trainer.max_epochs=3", f"run_dir={tmp_path / 'full'}"]))
    train(compose_cfg([*common, "trainer.max_epochs=2", f"run_dir={tmp_path / 'cut'}"]))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    train(compose_cfg([*common, "trainer.max_epochs=3", f"resume={last}", f"run_dir={tmp_path / 'cut'}"]))

    full, cut = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                 for r in ("full", "cut"))
    assert (full["epoch"], full["global_step"]) == (cut["epoch"], cut["global_step"])
    groups = [opt["param_groups"] for opt in (full["optimizer_states"][0], cut["optimizer_states"][0])]
    assert groups[0] == groups[1]
    assert [g["name"] for g in groups[0]] == ["head", "backbone"]
    trained = [set(opt["state"]) for opt in (full["optimizer_states"][0], cut["optimizer_states"][0])]
    assert trained[0] == trained[1]  # the same tensors ever received gradients
    assert 0 < len(trained[0]) < len(groups[0][0]["params"]) + len(groups[0][1]["params"])
    # The first half of the backbone never trained in either run: bit-identical, BatchNorm statistics included.
    start_cfg = compose_cfg(common)
    pl.seed_everything(start_cfg.seed, workers=True)
    start = build_module(start_cfg).state_dict()
    frozen = [{k for k in start if k.startswith("net.backbone.") and torch.equal(start[k], ck["state_dict"][k])}
              for ck in (full, cut)]
    assert frozen[0] == frozen[1] and any("running_mean" in k for k in frozen[0])
    summaries = [read_summary(tmp_path / r) for r in ("full", "cut")]
    assert summaries[0]["trainable_params"] == summaries[1]["trainable_params"] < summaries[0]["total_params"]
    assert summaries[0]["unfrozen_fraction"] == summaries[1]["unfrozen_fraction"] == 0.5
    assert summaries[1]["epochs_run"] == 3


def test_pipeline_curves_join_phases_on_one_axis(two_phases: dict[str, Path], tmp_path: Path) -> None:
    runs = [("head", two_phases["head"]), ("unfreeze_half", two_phases["half"])]
    joined, boundaries = join_phases(runs)
    assert list(joined["epoch"]) == [0, 1] and list(joined["phase"]) == ["head", "unfreeze_half"]
    assert [label for _, label in boundaries] == ["head", "unfreeze_half"]
    assert boundaries[0][0] < 0 < boundaries[1][0] < 1
    write_pipeline_report(tmp_path, runs)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "pipeline.json").is_file()


@pytest.mark.slow
def test_pipeline_command_runs_phases_in_order(tiny_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "carnet.training.pipeline", "--phases", "head,unfreeze_half", f"data.root={tiny_data}",
         *ONE_BATCH,
         f"paths.output_dir={tmp_path}", "unfreeze_half:image_size=48"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((tmp_path / "pipeline").glob("*/*"))
    assert [r.name for r in runs] == ["1-head", "2-unfreeze_half"]
    assert read_summary(runs[1])["image_size"] == 48 and read_summary(runs[0])["image_size"] == 64
    assert (tmp_path / "phases" / "curves.png").is_file()
