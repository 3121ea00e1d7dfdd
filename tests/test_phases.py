"""Phases: hand-off through ${paths.phases}, errors for missing/mismatching predecessors, resume mid-schedule,
the joined pipeline curves (carnet/training/phases.py, carnet/training/pipeline.py, conf/phase)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from rich.console import Console

from carnet.errors import CarnetError, PhaseError
from carnet.runtime import resolve_runtime
from carnet.summary import read_summary
from carnet.training import pipeline
from carnet.training.builders import build_module
from carnet.training.phases import Phase, join_phases, write_pipeline_report
from carnet.training.pipeline import plan_pipeline, run_pipeline
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH
from tests.helpers.paths import CONF, REPO
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
    fresh = build_module(cfg, resolve_runtime(cfg)).state_dict()
    assert not torch.equal(fresh["net.head.1.weight"], handed["net.head.1.weight"])
    assert all(torch.equal(fresh[k], handed[k]) for k in handed if k.startswith("net.backbone."))  # frozen in head

    head, half = read_summary(runs["head"]), read_summary(runs["half"])
    assert (head.phase, head.init_from, head.unfrozen_fraction) == ("head", None, 0.0)
    assert head.trainable_params == sum(v.numel() for k, v in handed.items() if k.startswith("net.head."))
    assert (half.phase, half.init_from, half.unfrozen_fraction) == ("unfreeze_half", str(head_ckpt), 0.5)
    assert head.trainable_params < half.trainable_params < half.total_params
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
    start = build_module(start_cfg, resolve_runtime(start_cfg)).state_dict()
    frozen = [{k for k in start if k.startswith("net.backbone.") and torch.equal(start[k], ck["state_dict"][k])}
              for ck in (full, cut)]
    assert frozen[0] == frozen[1] and any("running_mean" in k for k in frozen[0])
    summaries = [read_summary(tmp_path / r) for r in ("full", "cut")]
    assert summaries[0].trainable_params == summaries[1].trainable_params < summaries[0].total_params
    assert summaries[0].unfrozen_fraction == summaries[1].unfrozen_fraction == 0.5
    assert summaries[1].epochs_run == 3


def test_pipeline_curves_join_phases_on_one_axis(two_phases: dict[str, Path], tmp_path: Path) -> None:
    runs = [("head", two_phases["head"]), ("unfreeze_half", two_phases["half"])]
    joined, boundaries = join_phases(runs)
    # each phase from its start (epoch 0, validated before its first step), the next one where the last one ended
    assert list(joined["epoch"]) == [0, 1, 1, 2] and list(joined["phase_epoch"]) == [0, 1, 0, 1]
    assert list(joined["phase"]) == ["head", "head", "unfreeze_half", "unfreeze_half"]
    assert boundaries == [(0, "head"), (1, "unfreeze_half")]
    summaries = [read_summary(run_dir) for _, run_dir in runs]
    # an epoch is kept when it led to what the phase handed on (summary.json's best epoch; 0: its start)
    best = [summary.best_epoch for summary in summaries for _ in range(2)]
    assert list(joined["kept"]) == [e <= b for e, b in zip(joined["phase_epoch"], best, strict=True)]
    write_pipeline_report(tmp_path, runs)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "pipeline.json").read_text())["phases"]
    assert [(row["phase"], row["best_epoch"], row["kept_start"]) for row in rows] == [
        (phase, summary.best_epoch, summary.kept_start) for (phase, _), summary in zip(runs, summaries, strict=True)]


@pytest.mark.slow
def test_pipeline_command_runs_phases_in_order(tiny_data: Path, tmp_path: Path) -> None:
    """The command runs its phases in order in its own folder; --dir of that folder resumes it with later phases."""
    def pipeline(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "carnet.training.pipeline", *args, f"data.root={tiny_data}",
                               *ONE_BATCH, f"paths.output_dir={tmp_path}", "unfreeze_half:image_size=48",
                               "refit=false"],  # the refit's own runs: test_refit.py
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    pipeline("--phases", "head")
    (folder,) = (tmp_path / "pipeline").iterdir()
    pipeline("--dir", str(folder), "--phases", "unfreeze_half")  # as a stopped pipeline is resumed
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "phases")
    assert [r.name for r in runs] == ["1-head", "2-unfreeze_half"]
    assert read_summary(runs[1]).image_size == 48 and read_summary(runs[0]).image_size == 64
    assert read_summary(runs[1]).init_from == str(folder / "phases" / "head.ckpt")
    report = json.loads((folder / "pipeline.json").read_text())
    assert [r["run_dir"] for r in report["phases"]] == [str(r) for r in runs]
    assert (folder / "curves.png").is_file() and not (tmp_path / "phases").exists()


PHASES_LOG = "carnet.training.phases"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PHASES_LOG and r.levelname == "WARNING"]


def test_frozen_phase_from_random_weights_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A frozen backbone from random weights trains a head on noise: accuracy stays at chance, so say so."""
    caplog.set_level("WARNING", logger=PHASES_LOG)
    for phase in ("head", "progressive"):  # frozen at epoch 0, no init_from
        caplog.clear()
        Phase.from_config(compose_cfg([f"phase={phase}", "model=test_efficientnet", "model.pretrained=false"]))
        assert len(warnings_of(caplog)) == 1, phase
        assert "random weights" in warnings_of(caplog)[0] and "model.pretrained" in warnings_of(caplog)[0]
    weights_file = tmp_path / "backbone.safetensors"
    weights_file.write_bytes(b"")  # only its name matters here: the config says where the weights come from
    for fine in (["phase=head", "model=test_efficientnet", "model.pretrained=true"],
                 ["phase=head", "model=test_efficientnet", "model.pretrained=false", f"model.weights={weights_file}"],
                 ["model=test_efficientnet", "model.pretrained=false"],              # a plain run trains everything
                 ["model=test_efficientnet", "model.pretrained=false", "unfreeze=1.0"]):
        caplog.clear()
        Phase.from_config(compose_cfg(fine))
        assert warnings_of(caplog) == [], fine


def test_phase_runs_say_what_they_load_and_where_they_write(tiny_data: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=PHASES_LOG)
    common = [f"data.root={tiny_data}", *ONE_BATCH, f"paths.output_dir={tmp_path / 'outputs'}",
              "head_fit.enabled=false"]
    phases = tmp_path / "outputs" / "phases"
    train(compose_cfg([*common, "phase=head", f"run_dir={tmp_path / 'head'}"]))
    said = "\n".join(r.getMessage() for r in caplog.records if r.name == PHASES_LOG)
    assert "random weights" in said  # test_efficientnet has no pretrained weights (TINY: model.pretrained=false)
    assert str(tmp_path / "head") in said and str(phases / "head.ckpt") in said
    caplog.clear()
    train(compose_cfg([*common, "phase=unfreeze_half", f"run_dir={tmp_path / 'half'}"]))
    said = "\n".join(r.getMessage() for r in caplog.records if r.name == PHASES_LOG)
    assert f"init_from={phases / 'head.ckpt'}" in said
    assert str(tmp_path / "half") in said and str(phases / "unfreeze_half.ckpt") in said


def test_the_pipeline_runs_the_phases_in_their_init_from_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """conf/phase's init_from chain is the one statement of the phase order: a phase added to the chain joins
    carnet-pipeline's default phases in its place; a chain that forks is refused in one line."""
    conf = Path(shutil.copytree(CONF, tmp_path / "conf"))
    monkeypatch.setattr(pipeline, "config_dir", lambda: conf)
    added = (conf / "phase" / "unfreeze_half.yaml").read_text().replace("phase: unfreeze_half", "phase: unfreeze_2q")
    (conf / "phase" / "unfreeze_2q.yaml").write_text(added.replace("init_from: head", "init_from: unfreeze_half"))
    third = conf / "phase" / "unfreeze_3q.yaml"
    third.write_text(third.read_text().replace("init_from: unfreeze_half", "init_from: unfreeze_2q"))
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    assert "head,unfreeze_half,unfreeze_2q,unfreeze_3q,unfreeze_all,finetune_448" in capsys.readouterr().out.replace(
        "\n", "").replace(" ", "")
    third.write_text(third.read_text().replace("init_from: unfreeze_2q", "init_from: unfreeze_half"))
    with pytest.raises(CarnetError, match="unfreeze_2q and unfreeze_3q both start from unfreeze_half"):
        pipeline.phase_order()


def test_pipeline_phases_hand_off_inside_the_pipeline_folder(tmp_path: Path) -> None:
    """Each phase command of carnet-pipeline resolves ${paths.phases} to <pipeline folder>/phases, not the
    shared <output_dir>/phases of single runs; a resumed pipeline (--dir) continues its folder's numbering."""
    folder, commands = plan_pipeline([f"paths.output_dir={tmp_path}", "unfreeze_half:image_size=48"],
                                     ["head", "unfreeze_half"])
    assert folder.parent == tmp_path / "pipeline"
    assert [(phase, run_dir) for phase, run_dir, _ in commands] == [("head", folder / "1-head"),
                                                                   ("unfreeze_half", folder / "2-unfreeze_half")]
    for phase, run_dir, command in commands:
        overrides = [a for a in command if "=" in a and not a.startswith("hydra.")]
        cfg = compose_cfg(overrides)
        assert (cfg.phase, cfg.paths.phases) == (phase, str(folder / "phases"))
        assert f"hydra.run.dir={run_dir}" in command
    assert compose_cfg([a for a in commands[1][2] if "=" in a and not a.startswith("hydra.")]).image_size == 48
    # a resumed pipeline takes the same overrides: one for a phase it does not run is left out
    _, head_only = plan_pipeline([f"paths.output_dir={tmp_path}", "unfreeze_half:image_size=48"], ["head"])
    assert not [a for a in head_only[0][2] if "image_size" in a]
    (folder / "1-head").mkdir(parents=True)
    (folder / "2-unfreeze_half").mkdir()
    again, resumed = plan_pipeline([f"paths.output_dir={tmp_path}"], ["unfreeze_half"], folder=folder)
    assert again == folder and [run_dir for _, run_dir, _ in resumed] == [folder / "3-unfreeze_half"]
    # paths.phases given by the user wins (a chain that continues from single runs' hand-offs)
    _, mine = plan_pipeline([f"paths.phases={tmp_path / 'mine'}"], ["head"])
    assert compose_cfg([a for a in mine[0][2] if "=" in a and not a.startswith("hydra.")]).paths.phases == \
        str(tmp_path / "mine")


def test_a_pipeline_continued_without_its_folder_says_which_folder_before_starting(tmp_path: Path) -> None:
    """`--phases unfreeze_all,...` without --dir used to start a new folder whose first phase then failed
    (init_from=unfreeze_3q: not found); now it stops first, naming the pipeline folder that holds the hand-off."""
    earlier = tmp_path / "pipeline" / "2026-01-01_10-00-00"
    (earlier / "phases").mkdir(parents=True)
    (earlier / "phases" / "unfreeze_3q.ckpt").write_bytes(b"a hand-off")
    with pytest.raises(SystemExit) as stopped:
        run_pipeline([f"paths.output_dir={tmp_path}"], ["unfreeze_all", "finetune_448"],
                     console=Console(file=io.StringIO()))
    assert f"carnet-pipeline --dir {earlier} --phases unfreeze_all,finetune_448" in str(stopped.value.code)
    assert sorted(p.name for p in (tmp_path / "pipeline").iterdir()) == [earlier.name]  # nothing started


@pytest.mark.slow
def test_pipeline_keeps_its_hand_offs_in_its_own_folder(tiny_data: Path, tmp_path: Path) -> None:
    """carnet-pipeline never overwrites ${paths.phases} of the single runs (another chain's hand-offs)."""
    shared = tmp_path / "phases" / "head.ckpt"
    shared.parent.mkdir()
    shared.write_bytes(b"another chain's head phase")
    folder = run_pipeline([f"data.root={tiny_data}", *ONE_BATCH, f"paths.output_dir={tmp_path}",
                           "head_fit.enabled=false"], ["head"], console=Console(file=io.StringIO()))
    assert shared.read_bytes() == b"another chain's head phase"
    assert folder.parent == tmp_path / "pipeline"
    summary = read_summary(folder / "1-head")
    assert summary.phase_checkpoint == str(folder / "phases" / "head.ckpt")
    assert (folder / "phases" / "head.ckpt").is_file()
    report = json.loads((folder / "pipeline.json").read_text())
    assert [(r["phase"], r["run_dir"]) for r in report["phases"]] == [("head", str(folder / "1-head"))]
    assert (folder / "curves.png").is_file()
