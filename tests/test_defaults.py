"""Each default is stated once, in conf/ (issue 19 item 2). The classes a config builds take no default that could
disagree with it: `label_smoothing` was 0.0 in CarClassifier and 0.1 in conf/train.yaml, the best epoch `val/acc` in
RunArtifacts and `val/loss` in conf/, the progress bar's cadence 50 steps in Python and 10 in conf/, so code that
built these objects itself (tests, benchmarks, a notebook) silently trained another recipe.

Each test builds an object twice: as train.py or predict.py builds it from conf/, and in Python with only the
arguments its signature requires, each read from conf/. The two must be the same object, and no argument that
conf/ gives may have a default of its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from carnet.data.datamodule import CarDataModule
from carnet.inference.runner import Runner
from carnet.runtime import resolve_runtime
from carnet.training.builders import build_callbacks, build_datamodule, build_module
from carnet.training.console import console_callbacks
from carnet.training.finetune import ProgressiveUnfreezing
from carnet.training.head_fit import HeadFit
from carnet.training.module import CarClassifier
from carnet.training.phases import Phase
from carnet.training.run_dir import RunArtifacts
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


def required(function: Callable[..., Any]) -> list[str]:
    """The parameters a caller must give: those without a default."""
    return [name for name, p in inspect.signature(function).parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def defaulted(function: Callable[..., Any], names: set[str]) -> set[str]:
    """Which of ``names`` (arguments conf/ gives) ``function`` states a default for too."""
    return {name for name, p in inspect.signature(function).parameters.items() if name in names
            and p.default is not p.empty}


def in_python(function: Callable[..., Any], conf: dict[str, Any]) -> Any:
    """``function`` called with only its required arguments, each read from ``conf`` (what conf/ says)."""
    return function(**{name: conf[name] for name in required(function)})


def test_carclassifier_in_python_is_the_recipe_of_conf() -> None:
    cfg = compose_cfg(TINY)
    from_conf = build_module(cfg, resolve_runtime(cfg))
    conf = dict(from_conf.hparams)  # every argument build_module gave, from conf/
    assert defaulted(CarClassifier, set(conf)) == set()
    assert dict(in_python(CarClassifier, conf).hparams) == conf


def test_carclassifier_learning_rate_is_the_optimizers() -> None:
    """The head's rate is optimizer.lr, with no fallback of its own (it was `.get("lr", 1e-3)`)."""
    cfg = compose_cfg([*TINY, "optimizer.lr=0.05", "backbone_lr_mult=0.5"])
    groups = build_module(cfg, resolve_runtime(cfg)).param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.05), ("backbone", 0.025)]


def test_datamodule_in_python_is_the_recipe_of_conf(tiny_data: Path) -> None:
    cfg = compose_cfg([*TINY, f"data.root={tiny_data}", "data.verify=false"])
    runtime = resolve_runtime(cfg)
    module = build_module(cfg, runtime)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("_target_")
    conf = {**data, "image_size": cfg.image_size, "seed": cfg.seed, "data_config": module.data_config,
            "augment": OmegaConf.to_container(cfg.augment.train, resolve=True), "num_workers": runtime.num_workers,
            "decode": runtime.decode, "pin_memory": runtime.pin_memory}
    assert defaulted(CarDataModule, set(conf)) == set()

    def what_it_does(dm: CarDataModule) -> dict[str, Any]:
        dm.setup("fit")
        loader = dm.train_dataloader()
        return {"split": dm.split.to_dict("list"), "train view": repr(dm.train_transform()),
                "eval view": repr(dm.eval_transform()), "extra": dm.extra, "cache": (dm.cache.mode, dm.cache.cache_dir),
                "loader": (loader.batch_size, loader.num_workers, loader.pin_memory, type(loader.dataset).__name__),
                "checks": (dm.strict, dm.verify, dm.dedup, dm.dedup_threshold, dm.num_folds, dm.fold)}

    assert what_it_does(in_python(CarDataModule, conf)) == what_it_does(build_datamodule(cfg, module, runtime))


def test_predict_runner_in_python_is_the_recipe_of_conf() -> None:
    from_conf = Runner.from_config(compose_cfg(["ckpt=x.ckpt"], config_name="predict"))
    conf = {name: getattr(from_conf, name) for name in inspect.signature(Runner).parameters}
    assert defaulted(Runner, set(conf)) == set()
    assert in_python(Runner, conf) == from_conf


def test_the_best_epoch_is_judged_alike_everywhere(tmp_path: Path) -> None:
    """checkpoint.monitor and .mode pick best.ckpt, summary.json's best epoch and a phase's hand-off: one choice."""
    cfg = compose_cfg([*TINY, "phase=head", f"paths.phases={tmp_path / 'phases'}"])
    conf = {"run_dir": tmp_path, "summary": {}, "monitor": cfg.checkpoint.monitor, "mode": cfg.checkpoint.mode}
    assert defaulted(RunArtifacts, {"monitor", "mode"}) == defaulted(Phase, {"monitor", "mode"}) == set()
    artifacts = in_python(RunArtifacts, conf)
    phase = next(c for c in build_callbacks(cfg) if isinstance(c, Phase))
    assert (artifacts.monitor, artifacts.mode) == (phase.monitor, phase.mode) == ("val/loss", "min")


def test_callbacks_in_python_are_the_recipe_of_conf(tmp_path: Path) -> None:
    """The unfreezing's BatchNorm policy, the head fit's views and folds, the progress bar's cadence."""
    cfg = compose_cfg([*TINY, "phase=head", f"paths.phases={tmp_path / 'phases'}"])
    built = {type(c): c for c in build_callbacks(cfg)}
    unfreeze = in_python(ProgressiveUnfreezing, {"schedule": cfg.unfreeze, "bn": cfg.bn})
    assert defaulted(ProgressiveUnfreezing, {"bn"}) == set() and unfreeze.bn == built[ProgressiveUnfreezing].bn
    keys = ("views", "folds", "max_images", "pseudo_label", "seed")
    head_fit = in_python(HeadFit, {**{k: cfg.head_fit.get(k) for k in keys}, "seed": cfg.seed})
    assert defaulted(HeadFit, set(keys)) == set()
    assert [getattr(head_fit, k) for k in keys] == [getattr(built[HeadFit], k) for k in keys]
    conf = {"progress": True, "summary": False, "metrics_every": cfg.trainer.log_every_n_steps}
    assert defaulted(console_callbacks, {"metrics_every"}) == set()
    bar, _ = console_callbacks(**{name: conf[name] for name in required(console_callbacks)}, tty=True)  # + EpochLines
    assert bar.metrics_every == cfg.trainer.log_every_n_steps == 10
