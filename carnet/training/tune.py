"""``tune=lr_find``: the learning-rate range test on the run's own module, data and phase, without training.

The learning rate rises from ``tune.min_lr`` to ``tune.max_lr`` over ``tune.num_training`` optimizer steps, one
batch each, and the loss of every batch is recorded. Writes ``lr_find.png`` (loss against learning rate, the
suggestion and the configured rate marked) and ``lr_find.json`` in the run directory and prints the suggestion for
``optimizer.lr`` (the head's rate; every parameter group keeps its ratio to it, so the backbone is tested, as it
trains, at ``backbone_lr_mult`` x that).

Why not Lightning's ``Tuner.lr_find``: it records an exponential average of the loss (beta 0.98, about 50 steps)
whose bias correction counts from the wrong step, so a random 10-class model's curve started at half its loss
(1.16 instead of 2.30) and climbed for 50 steps: the curve showed the average catching up, not the loss, and its
steepest-slope suggestion fell on that artefact (1.4e-4 for the demo, which trains well at 4e-3). It also draws a
tqdm bar into logs, saves and restores a temporary checkpoint (a ``weights_only`` warning, "Restoring states"
twice), all for a run that does not train afterwards. The test is a few lines of callback: raw losses in, a
centred (lag-free) smoothing, a stated rule out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from carnet.artifacts import write_json
from carnet.config_check import SEARCH_MODES, TUNE_MODES
from carnet.data.datamodule import CarDataModule
from carnet.errors import CarnetError
from carnet.runtime import Runtime
from carnet.training.builders import build_trainer
from carnet.training.module import CarClassifier

PLOT_FILE, RESULT_FILE = "lr_find.png", "lr_find.json"
# The suggestion: the rate at the smoothed loss's minimum, divided by this (Smith 2017; fastai's "minimum/10"):
# at the minimum the loss has stopped falling, an order of magnitude below it it still falls steadily.
BELOW_MINIMUM = 10.0
# The smoothed loss must fall by this many times the steps' own scatter around it before its minimum, else no
# suggestion: a curve that stays within its noise (a model that learns too little in these steps, a fitted head)
# says nothing about a good rate.
MIN_DROP_IN_NOISE = 3.0
# What to try when the curve says nothing: a model trained from scratch (the demo) moves its loss only over the last
# two or three decades of the default range; 200 steps over 4 decades put 50 steps in each.
NARROWER = "tune.min_lr=1e-4 tune.num_training=200"


def _tune_config(cfg: DictConfig) -> DictConfig:
    """The run config for the test's trainer: no loggers, no validation, steps bounded by the search."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger = None
        # max_steps (not epochs) bounds the search, so short epochs on small data still give enough points.
        cfg.trainer.max_steps = int(cfg.tune.num_training)
        cfg.trainer.max_epochs = -1
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


def smooth(losses: list[float], window: int) -> np.ndarray:
    """A centred rolling median of ``window`` points (fewer at the ends): no lag, unlike an exponential average,
    and single spikes (a hard batch, a step past the divergence) do not pull it."""
    values = np.asarray(losses, dtype=float)
    half = window // 2
    return np.array([np.nanmedian(values[max(0, i - half):i + half + 1]) for i in range(len(values))])


def suggest(lrs: list[float], losses: list[float]) -> tuple[float | None, str, np.ndarray]:
    """(suggested rate or None, why, smoothed losses): the rate at the smoothed loss's minimum, divided by
    :data:`BELOW_MINIMUM`, if the loss fell to it from its start by more than :data:`MIN_DROP_IN_NOISE` times the
    scatter of the steps (their median absolute deviation from the smoothed curve, as a standard deviation)."""
    if len(losses) < 8:
        return None, f"only {len(losses)} steps (raise tune.num_training)", np.asarray(losses, dtype=float)
    raw = np.array([x if math.isfinite(x) else math.nan for x in losses])
    smoothed = smooth(list(raw), max(5, len(raw) // 12) | 1)
    start = float(np.nanmedian(smoothed[: max(3, len(smoothed) // 10)]))
    best = int(np.nanargmin(smoothed))
    noise = 1.4826 * float(np.nanmedian(np.abs(raw[: best + 1] - smoothed[: best + 1])))
    drop = start - float(smoothed[best])
    if drop <= MIN_DROP_IN_NOISE * noise:
        return None, (f"the loss never fell clearly (from {start:.3g} to at best {smoothed[best]:.3g}, within the "
                      f"steps' scatter of {noise:.2g}): these {len(raw)} steps from {lrs[0]:.2g} to {lrs[-1]:.2g} "
                      f"are too few for this model to learn; try a narrower range with more steps ({NARROWER})"), \
            smoothed
    if best == len(smoothed) - 1:
        return None, (f"the loss still fell at the last rate tested ({lrs[-1]:.2g}): raise tune.max_lr or "
                      "tune.num_training"), smoothed
    return lrs[best] / BELOW_MINIMUM, (f"lowest smoothed loss {smoothed[best]:.3g} (from {start:.3g}) at lr "
                                       f"{lrs[best]:.2g}, suggested a tenth of that"), smoothed


class RangeTest(pl.Callback):
    """Sets the learning rate of each step, rising from ``min_lr`` to ``max_lr`` over ``steps`` steps, and records
    each step's training loss; stops once the loss passes ``stop_factor`` x its lowest (smoothed) value, or turns
    NaN or infinite.

    Like Lightning's own finder, the search keeps what the run's callbacks did in their ``setup`` (a phase's start
    weights and frozen set) and runs without them afterwards (no checkpoints, hand-off, head fit or epoch lines),
    and without the run's scheduler: this callback sets the rates. It must come last among the callbacks.
    """

    def __init__(self, min_lr: float, max_lr: float, steps: int, mode: str = "exponential",
                 stop_factor: float | None = 4.0) -> None:
        if mode not in SEARCH_MODES:
            raise CarnetError(f"tune.search={mode!r}: expected {' or '.join(SEARCH_MODES)}")
        if not 0 < min_lr < max_lr:
            raise CarnetError(f"tune.min_lr={min_lr}, tune.max_lr={max_lr}: expected 0 < min_lr < max_lr")
        self.min_lr, self.max_lr, self.steps, self.mode = float(min_lr), float(max_lr), int(steps), mode
        self.stop_factor = stop_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.ratios: list[float] = []
        self._average, self._lowest = 0.0, math.inf

    def lr_at(self, step: int) -> float:
        """The head's rate at ``step`` (0-based): ``min_lr`` at the first step, ``max_lr`` at the last."""
        r = step / max(1, self.steps - 1)
        if self.mode == "linear":
            return self.min_lr + r * (self.max_lr - self.min_lr)
        return self.min_lr * (self.max_lr / self.min_lr) ** r

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls every callback's setup from the list it started with: all of them set the model up.
        trainer.callbacks = [self]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.lr_scheduler_configs = []  # this callback sets the rates
        groups = trainer.optimizers[0].param_groups
        self.ratios = [group["lr"] / groups[0]["lr"] if groups[0]["lr"] else 1.0 for group in groups]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        lr = self.lr_at(len(self.lrs))
        for group, ratio in zip(trainer.optimizers[0].param_groups, self.ratios, strict=True):
            group["lr"] = lr * ratio
        self.lrs.append(lr)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss) if loss is not None else math.nan
        self.losses.append(value)
        # Stopping needs the trend, not one bad batch: an exponential average over ~10 steps, its bias corrected by
        # the number of steps it has seen.
        self._average = 0.9 * self._average + 0.1 * value
        trend = self._average / (1 - 0.9 ** len(self.losses))
        self._lowest = min(self._lowest, trend)
        if not math.isfinite(value) or (self.stop_factor is not None and len(self.losses) > 1
                                        and trend > self.stop_factor * self._lowest):
            trainer.should_stop = True


def lr_find(cfg: DictConfig, module: CarClassifier, datamodule: CarDataModule, run_dir: Path, runtime: Runtime,
            callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Run the range test; write the plot and the result; return ``{"suggested_lr": ..., ...}``."""
    options = cfg.tune
    test = RangeTest(float(options.min_lr), float(options.max_lr), int(options.num_training), str(options.search),
                     options.early_stop_threshold)
    trainer = build_trainer(_tune_config(cfg), run_dir, [*(callbacks or []), test], runtime)
    trainer.callbacks = [c for c in trainer.callbacks if c is not test] + [test]  # last: its setup drops the rest
    print(f"lr_find: {test.steps} steps, lr from {test.min_lr:.2g} to {test.max_lr:.2g} ({test.mode})", flush=True)
    trainer.fit(module, datamodule=datamodule)
    suggestion, why, smoothed = suggest(test.lrs, test.losses)
    current = float(OmegaConf.select(cfg, "optimizer.lr", default=math.nan))
    result = {
        "status": "tuned",
        "suggested_lr": suggestion,
        "why": why,
        "current_lr": current,
        "steps": len(test.losses),
        "plot": str(run_dir / PLOT_FILE),
        "lr": test.lrs,
        "loss": test.losses,
        "smoothed_loss": [float(x) for x in smoothed],
    }
    if trainer.is_global_zero:
        plot(result, f"LR range test: {cfg.model.name} @ {cfg.image_size} px", run_dir / PLOT_FILE)
        write_json(run_dir / RESULT_FILE, result)
        if suggestion is None:
            print(f"lr_find: no suggestion: {why}; plot {run_dir / PLOT_FILE}")
        else:
            print(f"suggested lr={suggestion:.3g} (config optimizer.lr={current:.3g}): {why}; plot "
                  f"{run_dir / PLOT_FILE}")
    return result


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    """Each step's loss (dots), the smoothed curve the suggestion is read from, the suggestion and the config's
    rate, on a log axis."""
    lrs, losses, smoothed = result["lr"], result["loss"], result["smoothed_loss"]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.plot(lrs, losses, ".", color="tab:blue", alpha=0.35, markersize=4, label="loss of each step")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed (centred median)")
    finite = [x for x in smoothed if math.isfinite(x)]
    if finite:  # the diverged tail would squash the curve: show up to twice its start
        ax.set_ylim(min(finite) * 0.9, max(finite[: max(3, len(finite) // 10)]) * 2)
    if result["suggested_lr"] is not None:
        lowest = int(np.nanargmin(smoothed))
        ax.plot(lrs[lowest], smoothed[lowest], "o", color="red", markersize=6, label=f"lowest at {lrs[lowest]:.2g}")
        ax.axvline(result["suggested_lr"], color="red", linewidth=1, label=f"suggested {result['suggested_lr']:.2g}")
    if math.isfinite(result["current_lr"]):
        ax.axvline(result["current_lr"], color="grey", linestyle="--", linewidth=0.8,
                   label=f"config lr {result['current_lr']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(cfg: DictConfig, module: CarClassifier, datamodule: CarDataModule, run_dir: Path, runtime: Runtime,
         callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Dispatch on ``tune.mode`` (called by :func:`carnet.training.train.train` for ``tune=...``)."""
    mode = cfg.tune.get("mode")
    if mode not in TUNE_MODES:
        raise CarnetError(f"tune.mode={mode!r} is not supported; expected one of {', '.join(TUNE_MODES)}")
    return lr_find(cfg, module, datamodule, run_dir, runtime, callbacks)
