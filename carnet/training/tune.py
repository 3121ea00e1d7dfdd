"""``tune=lr_find``: Lightning's learning-rate range test on the run's own module and data, without training.

Writes ``lr_find.png`` (loss against learning rate, suggestion marked) and ``lr_find.json`` in the run directory
and prints the suggested rate. The finder gives every parameter group the same rate, so the suggestion is for
``optimizer.lr`` (the head); the backbone then trains at ``backbone_lr_mult`` x that.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.tuner import Tuner

from carnet.artifacts import write_json
from carnet.config_check import TUNE_MODES
from carnet.data.datamodule import CarDataModule
from carnet.errors import CarnetError
from carnet.runtime import Runtime
from carnet.training.builders import build_trainer
from carnet.training.module import CarClassifier

PLOT_FILE, RESULT_FILE = "lr_find.png", "lr_find.json"


def _tune_config(cfg: DictConfig) -> DictConfig:
    """The run config for the finder's trainer: no loggers, steps bounded by the search, no sanity check."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger = None
        # max_steps (not epochs) bounds the search, so short epochs on small data still give enough points;
        # it also keeps estimated_stepping_batches finite for the schedulers built in configure_optimizers.
        cfg.trainer.max_steps = int(cfg.tune.num_training)
        cfg.trainer.max_epochs = -1
        cfg.trainer.num_sanity_val_steps = 0
    return cfg


def lr_find(cfg: DictConfig, module: CarClassifier, datamodule: CarDataModule, run_dir: Path, runtime: Runtime,
            callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Run the range test; write the plot and the result; return ``{"suggested_lr": ..., ...}``."""
    options = cfg.tune
    # with the phase's callbacks: its weights and frozen set
    trainer = build_trainer(_tune_config(cfg), run_dir, list(callbacks or []), runtime)
    finder = Tuner(trainer).lr_find(
        module, datamodule=datamodule, min_lr=float(options.min_lr), max_lr=float(options.max_lr),
        num_training=int(options.num_training), mode=str(options.search),
        early_stop_threshold=options.early_stop_threshold, update_attr=False,
    )
    if finder is None:
        raise RuntimeError("the learning-rate finder did not run (is trainer.fast_dev_run set?)")
    suggestion = finder.suggestion()
    current = float(OmegaConf.select(cfg, "optimizer.lr", default=math.nan))
    result = {
        "status": "tuned",
        "suggested_lr": float(suggestion) if suggestion is not None else None,
        "current_lr": current,
        "steps": len(finder.results.get("lr", [])),
        "plot": str(run_dir / PLOT_FILE),
        "lr": [float(x) for x in finder.results.get("lr", [])],
        "loss": [float(x) for x in finder.results.get("loss", [])],
    }
    if trainer.is_global_zero:
        fig = finder.plot(suggest=suggestion is not None)
        ax = fig.axes[0]
        if not math.isnan(current):
            ax.axvline(current, color="grey", linestyle="--", linewidth=0.8, label=f"config lr {current:.2g}")
        if suggestion is not None:
            ax.plot([], [], "o", color="red", label=f"suggested {suggestion:.2g}")
        ax.set_title(f"LR range test: {cfg.model.name} @ {cfg.image_size} px")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(run_dir / PLOT_FILE, dpi=110)
        plt.close(fig)
        write_json(run_dir / RESULT_FILE, result)
        if suggestion is None:
            print(f"lr_find: no suggestion from {result['steps']} steps (raise tune.num_training); plot "
                  f"{run_dir / PLOT_FILE}")
        else:
            print(f"suggested lr={suggestion:.3g} (config optimizer.lr={current:.3g}); plot {run_dir / PLOT_FILE}")
    return result


def tune(cfg: DictConfig, module: CarClassifier, datamodule: CarDataModule, run_dir: Path, runtime: Runtime,
         callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Dispatch on ``tune.mode`` (called by :func:`carnet.training.train.train` for ``tune=...``)."""
    mode = cfg.tune.get("mode")
    if mode not in TUNE_MODES:
        raise CarnetError(f"tune.mode={mode!r} is not supported; expected one of {', '.join(TUNE_MODES)}")
    return lr_find(cfg, module, datamodule, run_dir, runtime, callbacks)
