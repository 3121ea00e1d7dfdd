"""The values a user types are checked before anything is built (carnet/config_check.py, issue 18 item 6): one line
naming the key, the value and what was expected, instead of a traceback from wherever the value was first used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from carnet.errors import CarnetError
from carnet.training.pipeline import main as pipeline_main
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY
from tests.helpers.paths import CONF, REPO
from tests.helpers.runs import child_env, run_predict

# (override, what the one line says). The first five are the reproductions: a TypeError once training had
# started, a ZeroDivisionError, 71 lines from the DataLoader, timm's `Unknown model`, albumentations on data.augment0.
BAD_TRAIN_VALUES = [
    ("optimizer.lr=abc", "optimizer.lr='abc': expected a number >= 0 (the head's learning rate)"),
    ("data.batch_size=0", "data.batch_size=0: expected a whole number >= 1 (images per step)"),
    ("data.batch_size=-1", "data.batch_size=-1: expected a whole number >= 1 (images per step)"),
    ("model.name=efficientnet_b99_nope", "model.name='efficientnet_b99_nope': expected a model name timm"),
    ("image_size=0", "image_size=0: expected a whole number >= 32 (pixels"),
    ("model.name=test_efficientnet.bogus", "model.name='test_efficientnet.bogus': expected one of timm's pretrained "
                                           "tags of test_efficientnet: test_efficientnet.r160_in1k"),
    ("seed=-1", "seed=-1: expected a whole number in [0, 4294967295]"),
    ("label_smoothing=1.5", "label_smoothing=1.5: expected a number in [0, 1)"),
    ("backbone_lr_mult=-0.1", "backbone_lr_mult=-0.1: expected a number >= 0"),
    ("layer_decay=0", "layer_decay=0: expected null or a number in (0, 1]"),
    ("model.scales=[1,0.5]", "model.scales=[1, 0.5]: expected a list of one or more of: a number in [1, 4] (multiples"),
    ("pipeline.fork_phases=sometimes", "pipeline.fork_phases='sometimes': expected true or false"),
    ("mixup.prob=1.5", "mixup.prob=1.5: expected a number in [0, 1] (the share of batches mixed)"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay=nan: expected a number >= 0"),
    ("data.val_fraction=1", "data.val_fraction=1: expected a number in (0, 1)"),
    ("data.num_workers=-1", "data.num_workers=-1: expected auto or a whole number >= 0"),
    ("data.batch_size=2.5", "data.batch_size=2.5: expected a whole number >= 1"),
    ("data.fold=5", "data.fold=5: expected a fold index 0..4 (data.num_folds=5)"),
    ("data.cache=ram", "data.cache='ram': expected none, memory or disk"),
    ("checkpoint.monitor=val/f1", "checkpoint.monitor='val/f1': expected val/loss or val/acc"),
    ("optimizer.fused=yes", "optimizer.fused='yes': expected true, false or auto"),
    ("ema.decay=1", "ema.decay=1: expected null or a number in (0, 1)"),
    ("model.drop_rate=1", "model.drop_rate=1: expected a number in [0, 1)"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: expected a whole number >= 1"),
    ("scheduler.patience=-1", "scheduler.patience=-1: expected a whole number >= 0 (epochs)"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: expected a whole number >= 1 (epochs; budget.min_steps may add"),
    ("model.compile=fast", "model.compile='fast': expected true, false, regional or auto"),
    ("data.decode=fast", "data.decode='fast': expected cpu, gpu, auto or device"),
]


@pytest.mark.parametrize(("override", "message"), BAD_TRAIN_VALUES, ids=[o for o, _ in BAD_TRAIN_VALUES])
def test_bad_train_values_are_one_line_before_anything(override: str, message: str, tmp_path: Path) -> None:
    """Refused first: before the data folder is looked at (here it does not exist) and before the run directory is
    written; the line starts with the key and value as typed."""
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*TINY, f"data.root={tmp_path / 'missing'}", f"run_dir={run_dir}", override])
    with pytest.raises(CarnetError) as err:
        train(cfg)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text
    assert not run_dir.exists()


def test_train_py_says_every_bad_value_in_one_line(tmp_path: Path) -> None:
    """Through the real entry point: exit 1, one line on stderr naming both mistakes, no run files written."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "data.root=nowhere",
                           f"hydra.run.dir={run_dir}", "optimizer.lr=abc", "data.batch_size=0"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("train: error: optimizer.lr='abc': expected a number >= 0 (the head's learning "
                                   "rate); data.batch_size=0: expected a whole number >= 1 (images per step)")
    assert not (run_dir / "summary.json").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize(("script", "args", "line"), [
    ("train.py", ["optimizer=adamx"],
     "train: error: optimizer=adamx: conf/optimizer has no option 'adamx'; expected one of adam, adamw, sgd"),
    ("train.py", ["optimizer.lrr=1e-3"],
     "train: error: optimizer.lrr: no such key in the config; check its spelling, or add a new key with "
     "+optimizer.lrr=VALUE"),
    ("predict.py", ["ckpt=x.ckpt", "tta=tru"],
     "predict: error: tta=tru: conf/tta has no option 'tru'; expected one of auto, false, full, true"),
])
def test_a_mistyped_option_or_key_is_one_line(script: str, args: list[str], line: str, tmp_path: Path) -> None:
    """Hydra refuses these before carnet runs, in a dozen lines (its config search path, a HYDRA_FULL_ERROR hint):
    the one-line promise of the README held only for carnet's own checks. They come before torch is imported
    (carnet.training.cli, carnet.inference.cli): the script runs as ``python SCRIPT``, and prints at exit which of
    the heavy packages it loaded."""
    proc = subprocess.run([sys.executable, "-c", LOADED_AT_EXIT, str(REPO / script), *args,
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.strip()) == (1, line)
    assert proc.stdout == "loaded:"
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize(("args", "line"), [
    (["optimizer=adamx"],
     "pipeline: error: optimizer=adamx: conf/optimizer has no option 'adamx'; expected one of adam, adamw, sgd"),
    (["optimizer.lrr=1e-3"], "pipeline: error: optimizer.lrr: no such key in the config; check its spelling, or add "
                             "a new key with +optimizer.lrr=VALUE"),
    (["unfreeze_3q:optimizer.lr=abc"],
     "pipeline: error: phase unfreeze_3q: optimizer.lr='abc': expected a number >= 0 (the head's learning rate)"),
])
def test_a_pipeline_says_a_mistyped_override_in_one_line_before_any_phase(
        args: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """carnet-pipeline composed only its common overrides up front: a mistyped option was Hydra's 40-line
    traceback, and a value typed wrong for a later phase stopped the pipeline once the phases before it had
    trained. Every phase's config is now composed and checked first; nothing is written."""
    with pytest.raises(SystemExit) as stopped:
        pipeline_main(["--dir", str(tmp_path / "pipe"), f"paths.output_dir={tmp_path}", *args])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == line
    assert list(tmp_path.iterdir()) == []

# python -c LOADED_AT_EXIT SCRIPT ARGS: ``python SCRIPT ARGS``, then which heavy packages it imported.
LOADED_AT_EXIT = """
import atexit, runpy, sys
heavy = ("torch", "pytorch_lightning", "timm", "albumentations")
atexit.register(lambda: sys.stdout.write(" ".join(["loaded:", *(m for m in heavy if m in sys.modules)])))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_bad_predict_values_are_one_line_before_loading(tiny_data: Path, tmp_path: Path) -> None:
    """predict's own keys, checked before the (here unreadable) checkpoint is opened."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    common = [f"ckpt={garbage}", f"data.root={tiny_data}", f"out={tmp_path / 'submission.csv'}"]
    with pytest.raises(CarnetError) as err:
        run_predict(*common, "data.batch_size=0", "device=gpu0", "amp=sometimes")
    assert str(err.value) == ("data.batch_size=0: expected a whole number >= 1 (images per step); device='gpu0': "
                              "expected auto or a torch device (cpu, cuda, cuda:1); amp='sometimes': expected true, "
                              "false or auto")
    assert not (tmp_path / "submission.csv").exists()


def _option_sets() -> list[list[str]]:
    """Overrides that, together, pick every option of every group of conf/train.yaml at least once: the i-th set
    takes the i-th option of each group (fewer compositions than one per option: each costs a second on a busy
    CPU). A saved recipe (experiment) overrides what the rest set, so each comes alone."""
    options = {d.name: sorted(f.stem for f in d.glob("*.yaml") if not f.stem.startswith("_"))
               for d in sorted(CONF.iterdir()) if d.is_dir() and d.name not in ("hydra", "tta")}
    alone = [[f"experiment={name}"] for name in options.pop("experiment")]
    rounds = max(len(names) for names in options.values())
    return alone + [[f"{group}={names[i % len(names)]}" for group, names in options.items()] for i in range(rounds)]


def test_every_shipped_option_passes_and_every_rule_has_its_key() -> None:
    """No shipped config is refused, and no rule names a key that no config has (a typo would never check)."""
    from carnet.config_check import PREDICT, TRAIN, problems

    seen: set[str] = set()
    for overrides in _option_sets():
        cfg = compose_cfg(overrides)
        assert problems(cfg, TRAIN) == [], overrides
        seen |= {key for key, _, _ in TRAIN if OmegaConf.select(cfg, key, default="<absent>") != "<absent>"}
    assert {key for key, _, _ in TRAIN} - seen == set()
    predict = compose_cfg(["ckpt=x.ckpt"], config_name="predict")
    assert problems(predict, PREDICT) == []
    assert all(OmegaConf.select(predict, key, default="<absent>") != "<absent>" for key, _, _ in PREDICT)
