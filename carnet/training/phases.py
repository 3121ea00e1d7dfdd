"""Training phases: the hand-off of weights from one phase run to the next (:class:`Phase`), and the joined
curves of a pipeline.

A phase run (``python train.py phase=NAME``, see conf/phase) copies its best checkpoint to
``${paths.phases}/NAME.ckpt``; a later phase with ``init_from: NAME`` (or ``init_from=PATH``) starts from it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig

from carnet.artifacts import atomic_path, read_metrics, write_json
from carnet.config import plain
from carnet.errors import CheckpointError, PhaseError
from carnet.models.checkpoint import CHECKPOINT_KEY, read_checkpoint
from carnet.models.network import eval_mode
from carnet.plots import epoch_axis
from carnet.summary import RunSummary, read_summary
from carnet.training.finetune import fraction_at, parse_schedule
from carnet.training.module import CarClassifier

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
# What pipeline.json lists of each phase run, from its summary.json (carnet.summary.RunSummary's fields).
PIPELINE_KEYS = ("status", "best_val_acc", "best_epoch", "kept_start", "image_size", "trainable_params",
                 "planned_steps", "taken_steps", "stopped_early", "trained_on")


def phase_checkpoint(phases_dir: str | os.PathLike, phase: str) -> Path:
    return Path(phases_dir) / f"{phase}.ckpt"


def resolve_init_from(init_from: str, phases_dir: str | os.PathLike) -> Path:
    """``init_from`` as a file: a phase name means ``<phases_dir>/<name>.ckpt``, anything else is a path.

    A missing phase checkpoint is an error that names the command producing it.
    """
    text = str(init_from)
    is_path = text.endswith(".ckpt") or os.sep in text or "/" in text
    path = Path(text) if is_path else phase_checkpoint(phases_dir, text)
    if path.is_file():
        return path
    if is_path:
        raise PhaseError(f"init_from={text}: checkpoint {path} not found")
    raise PhaseError(f"init_from={text}: {path} not found. Run the '{text}' phase first: `python train.py "
                     f"phase={text}` with the same data/model/paths overrides (or pass init_from=PATH to a .ckpt)")


def check_fits(checkpoint: dict[str, Any], path: str | os.PathLike, model_name: str, head: Any,
               num_classes: int, key: str = "init_from") -> None:
    """The model, the head and the class count of ``checkpoint`` must be this run's; else name both sides and the
    ``key`` that named the checkpoint (``init_from``, ``resume``).

    The image size may differ (e.g. the 448 px phase starts from a 224 px one).
    """
    meta = checkpoint["carnet"]
    for label, theirs, mine in (("model", meta.get("model_name"), model_name),
                                ("head", plain(meta.get("head")), plain(head))):
        if theirs != mine:
            raise PhaseError(f"{key}={path} does not fit this run: the checkpoint's {label} is {theirs}, this "
                             f"run's {label} is {mine}")
    theirs_n = len(meta.get("class_names", []))
    if theirs_n != num_classes:
        raise PhaseError(f"{key}={path} does not fit this run: the checkpoint has {theirs_n} classes, this run "
                         f"has {num_classes} (data.class_names)")


def own_weights(cfg: DictConfig) -> str | None:
    """What the backbone starts from without ``init_from``: a ``model.weights`` file, timm's pretrained weights, or
    None (random weights)."""
    if cfg.model.get("weights"):
        return f"model.weights={cfg.model.weights}"
    if cfg.model.get("pretrained"):
        return f"timm's pretrained {cfg.model.name} weights (model.pretrained=true)"
    return None


def frozen_at_start(unfreeze: Any) -> bool:
    """Does the run start with (part of) its backbone frozen (``unfreeze`` below 1 in its first epoch)?"""
    return unfreeze is not None and fraction_at(parse_schedule(plain(unfreeze)), 0) < 1.0


def warn_if_frozen_random(cfg: DictConfig) -> None:
    """A frozen backbone with random weights gives the head noise to learn from: every epoch stays at chance.
    Nothing fails, so say it before the run spends its time."""
    if cfg.get("resume") or cfg.get("init_from") or own_weights(cfg) or not frozen_at_start(cfg.get("unfreeze")):
        return
    what = f"phase {cfg.phase}" if cfg.get("phase") else "this run"
    log.warning("%s trains on a frozen backbone (unfreeze=%s) with random weights: model %s has "
                "model.pretrained=false, no model.weights file and no init_from, so its accuracy will stay at "
                "chance; set model.pretrained=true, model.weights=PATH or init_from=PHASE|PATH", what,
                plain(cfg.unfreeze), cfg.model.name)


class Phase(pl.Callback):
    """One fine-tuning phase (conf/phase) as one object: it starts from ``init_from``'s weights and hands its best
    checkpoint on to ``<phases_dir>/<name>.ckpt`` for the next phase.

    Built once from the config (:meth:`from_config`), before anything else: a missing or mismatching predecessor
    fails fast, in one line. ``train()`` only passes it to the Trainer with the other callbacks.

    It also validates the weights it starts from (after ``head_fit``, before the first step) and counts them as a
    candidate for the phase's best checkpoint: a phase whose training never beats its start on validation
    (``monitor``) hands on its start, so no phase ends worse than the one before it.
    """

    def __init__(self, name: str | None, init_from: str | os.PathLike | None, phases_dir: str | os.PathLike,
                 model_name: str, head: Any, num_classes: int, *, monitor: str, mode: str,
                 starts_from: str | None = None, resume_from: str | os.PathLike | None = None,
                 refit: bool = False) -> None:
        self.name = name
        self.refit = refit  # a refit (carnet.training.refit) has no validation: no start to judge, its last weights
        self.resume_from = Path(resume_from) if resume_from else None  # the last.ckpt a resumed run continues
        self.phases_dir = Path(phases_dir)
        self.monitor, self.mode = monitor, mode
        self.init_path: Path | None = None
        self.init_checkpoint: dict[str, Any] | None = None
        self.published: Path | None = None
        self.start: dict[str, float] = {}
        self.kept_start = False
        self.init_size: int | None = None  # the predecessor's image size: a phase may change it (finetune_448)
        self.start_at_new_size: dict[str, float] = {}
        if init_from:
            self.init_path = resolve_init_from(init_from, phases_dir)
            try:
                self.init_checkpoint = read_checkpoint(self.init_path)
            except CheckpointError as err:
                raise PhaseError(f"init_from={init_from}: {err}") from err
            check_fits(self.init_checkpoint, self.init_path, model_name, head, num_classes)
            self.init_size = int(self.init_checkpoint["carnet"]["image_size"])
        # What the log says this run starts from (from_config knows the other sources: model weights, resume=).
        self.starts_from = f"init_from={self.init_path}" if self.init_path else (starts_from or "the model's weights")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Phase | None:
        """The phase of ``cfg`` (``phase``, ``init_from``); None for a plain run. A resumed run (``resume=``) takes
        its weights from its own checkpoint, so it loads no ``init_from``. Warns about a frozen backbone with random
        weights (:func:`warn_if_frozen_random`)."""
        warn_if_frozen_random(cfg)
        init_from = None if cfg.get("resume") else cfg.get("init_from")
        if not cfg.get("phase") and not init_from:
            return None
        starts_from = (f"resume={cfg.resume} (its own checkpoint)" if cfg.get("resume") else own_weights(cfg)
                       or "random weights (model.pretrained=false, no model.weights, no init_from)")
        return cls(cfg.get("phase"), init_from, cfg.paths.phases, cfg.model.name, cfg.head, len(cfg.data.class_names),
                   monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode, starts_from=starts_from,
                   resume_from=cfg.get("resume"), refit=bool(cfg.get("refit_from")))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            # One place that says what this run loads and where it writes (a chain of phases is hard to follow).
            hand_off = (f"hands its best checkpoint on as {phase_checkpoint(self.phases_dir, self.name)}"
                        if self.name else "hands nothing on (no phase name)")
            log.info("phase %s: starts from %s; run directory %s; %s", self.name or "-", self.starts_from,
                     trainer.default_root_dir, hand_off)
        if self.init_checkpoint is not None:
            load_init_weights(pl_module, self.init_path, self.init_checkpoint)
            self.init_checkpoint = None  # loaded once; free the memory

    def _start_path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.checkpoint_callback.dirpath) / "start.ckpt"

    def state_dict(self) -> dict[str, Any]:
        """What a resumed phase run needs of its start: the start's scores, and where it came from (summary.json)."""
        return {"start": self.start, "start_at_new_size": self.start_at_new_size, "init_size": self.init_size,
                "init_path": str(self.init_path) if self.init_path else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed phase run loads no ``init_from`` (its weights are in the checkpoint), but its start stays the
        candidate the phase hands on if no epoch beats it, as in the run it continues."""
        self.start = dict(state_dict.get("start") or {})
        self.start_at_new_size = dict(state_dict.get("start_at_new_size") or {})
        self.init_size = state_dict.get("init_size")
        self.init_path = Path(state_dict["init_path"]) if state_dict.get("init_path") else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.checkpoint_callback is None or self.refit:
            return
        if trainer.ckpt_path:  # resumed: its start was judged before; into a new folder, its start.ckpt comes along
            previous = self.resume_from.parent / "start.ckpt" if self.resume_from else None
            start = self._start_path(trainer)
            if self.start and not start.is_file() and previous is not None and previous.is_file():
                if trainer.is_global_zero:
                    with atomic_path(start) as tmp:
                        shutil.copyfile(previous, tmp)
            elif self.start and not start.is_file():
                log.warning("phase %s: its start weights (%s) are gone, so it cannot hand them on if no epoch beats "
                            "them", self.name, previous or start)
                self.start = {}
            return
        size = int(pl_module.hparams.image_size)
        if self.init_size is not None and self.init_size != size:
            # A new image size (finetune_448): the candidate start is the predecessor as it is, at its own size,
            # since that is what handing on the start would hand on. Its score at the new size is only reported.
            self.start = evaluate(pl_module, trainer.datamodule.val_dataloader(self.init_size), trainer)
            self.start_at_new_size = evaluate(pl_module, trainer.datamodule.val_dataloader(), trainer)
            if trainer.is_global_zero:
                with atomic_path(self._start_path(trainer)) as tmp:
                    shutil.copyfile(self.init_path, tmp)
            log.info("phase %s starts from %d px weights: val/loss=%.4f at %d px, %.4f at %d px", self.name,
                     self.init_size, self.start["val/loss"], self.init_size, self.start_at_new_size["val/loss"], size)
            return
        self.start = evaluate(pl_module, trainer.datamodule.val_dataloader(), trainer)
        if trainer.is_global_zero:
            save_weights(self._start_path(trainer), pl_module)
        log.info("phase %s starts at val/loss=%.4f val/acc=%.4f", self.name, self.start["val/loss"],
                 self.start["val/acc"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or trainer.interrupted or not trainer.is_global_zero:
            return
        best, score = callback.best_model_path, callback.best_model_score
        if self.refit and not best:  # a refit of a selection that kept its start takes no step: its start it is
            best = str(save_weights(Path(callback.dirpath) / "best.ckpt", pl_module))
        start = self.start.get(self.monitor)
        if start is not None and (not best or score is None or not better(float(score), start, self.mode)):
            self.kept_start = True  # training never beat the start on validation: the start is the best
            with atomic_path(Path(callback.dirpath) / "best.ckpt") as tmp:
                shutil.copyfile(self._start_path(trainer), tmp)
            best = str(Path(callback.dirpath) / "best.ckpt")
            log.warning("phase %s: no epoch beat its start on %s (%.4f); it hands on its start weights",
                        self.name, self.monitor, start)
        self._start_path(trainer).unlink(missing_ok=True)
        if self.name and best:
            self.published = publish_checkpoint(best, self.phases_dir, self.name)
            log.info("phase %s: handed on %s as %s (init_from: %s for the next phase)", self.name, best,
                     self.published, self.name)

    def add_to_summary(self, summary: RunSummary) -> None:
        """What summary.json records of this phase (:class:`carnet.summary.SummaryReporter`)."""
        summary.update(phase=self.name, init_from=str(self.init_path) if self.init_path else None)
        if self.start:
            summary.update(start_val_loss=self.start["val/loss"], start_val_acc=self.start["val/acc"],
                           kept_start=self.kept_start)
        if self.start_at_new_size:
            summary.update(start_image_size=self.init_size,
                           start_val_loss_at_image_size=self.start_at_new_size["val/loss"],
                           start_val_acc_at_image_size=self.start_at_new_size["val/acc"])
        if self.kept_start:  # the phase's best is its start: epoch 0, the weights before the first epoch
            summary.update(best_epoch=0, best_val_loss=self.start["val/loss"], best_val_acc=self.start["val/acc"])
        if self.published is not None:
            summary.phase_checkpoint = str(self.published)


def better(score: float, reference: float, mode: str, rel_tol: float = 1e-5) -> bool:
    """Is ``score`` better than ``reference`` (``mode`` min or max, as ModelCheckpoint's) by more than rounding?
    (The Trainer averages per-batch means in float32; :func:`evaluate` sums: equal weights differ in the 7th digit.)"""
    margin = rel_tol * max(abs(reference), 1e-12)
    return score < reference - margin if mode == "min" else score > reference + margin


@torch.no_grad()
def evaluate(pl_module: pl.LightningModule, loader: Iterable, trainer: pl.Trainer) -> dict[str, float]:
    """Validation loss and accuracy of the current weights, computed as ``validation_step`` does (a plain loop: the
    Trainer's validation loop cannot run before the first epoch and count for checkpointing)."""
    loss, correct, count = 0.0, 0, 0
    with eval_mode(pl_module):
        for images, labels in loader:
            images, labels = images.to(pl_module.device), labels.to(pl_module.device)
            with trainer.precision_plugin.forward_context():
                batch_loss, logits, _ = pl_module._step((images, labels))  # the loss validation_step computes
            loss += batch_loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    return {"val/loss": loss / max(1, count), "val/acc": correct / max(1, count)}


def save_weights(path: str | os.PathLike, pl_module: pl.LightningModule) -> Path:
    """A weights-only carnet checkpoint of the module as it is (what predict and the next phase read)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": pl_module.state_dict(), CHECKPOINT_KEY: pl_module.inference_meta()}, tmp)
    return Path(path)


def load_init_weights(module: CarClassifier, path: str | os.PathLike,
                      checkpoint: dict[str, Any] | None = None) -> None:
    """Load a carnet checkpoint's network weights into ``module`` (after :func:`check_fits`).

    Only weights move: optimizer, scheduler and epoch start fresh (that is what makes it a new phase).
    """
    if checkpoint is None:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            raise PhaseError(f"init_from: {err}") from err
    mine = module.inference_meta()
    check_fits(checkpoint, path, mine["model_name"], mine["head"], len(mine["class_names"]))
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    module.net.load_state_dict(state)


def publish_checkpoint(best: str | os.PathLike, phases_dir: str | os.PathLike, phase: str) -> Path:
    """Copy a run's best checkpoint to ``<phases_dir>/<phase>.ckpt`` atomically (temp file + rename)."""
    target = phase_checkpoint(phases_dir, phase)
    with atomic_path(target) as tmp:
        shutil.copyfile(best, tmp)
    return target


def join_phases(runs: list[tuple[str, str | os.PathLike | None]]) -> tuple[pd.DataFrame, list[tuple[float, str]]]:
    """Metrics of consecutive phase runs on one axis of epochs trained since the pipeline began, and the
    (position, label) of each phase's start.

    Each phase's rows start with its start (``phase_epoch`` 0: the weights it began from, as it validated them,
    summary.json's ``start_val_*``), drawn where the previous phase ended. ``kept``: the epoch lies on the way to
    what the phase handed on (its best epoch and those before it); the epochs after it, and every epoch of a phase
    that handed on its start, were thrown away. ``handed_on``: the phase's best epoch (0: its start). A phase the
    pipeline skipped (``run_dir`` None) has no rows."""
    frames, boundaries, offset = [], [], 0
    for phase, run_dir in runs:
        if run_dir is None:
            continue
        metrics, summary = read_metrics(run_dir), read_summary(run_dir, missing_ok=True)
        boundaries.append((offset, phase))
        best = summary.best_epoch if summary is not None else None
        if summary is not None and summary.start_val_loss is not None:
            start = {"epoch": 0, "val/loss": summary.start_val_loss, "val/acc": summary.start_val_acc}
            metrics = pd.concat([pd.DataFrame([start]), metrics], ignore_index=True)
        if not len(metrics):
            continue
        phase_epoch = metrics["epoch"].astype(int)
        frames.append(metrics.assign(
            phase=phase, phase_epoch=phase_epoch, epoch=phase_epoch + offset,
            kept=phase_epoch <= best if best is not None else True,
            handed_on=(phase_epoch == best) & (summary is not None and summary.status == "completed")))
        offset += int(phase_epoch.max())
    joined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["epoch"])
    return joined, boundaries


THROWN = "thrown away (not handed on)"


def plot_pipeline(joined: pd.DataFrame, boundaries: list[tuple[float, str]], path: str | os.PathLike,
                  title: str = "") -> Figure:
    """A pipeline's curves.png: accuracy and loss of every phase on one axis (:func:`join_phases`), each phase from
    its start, what it handed on marked, the epochs it threw away faded and dotted; accuracy from 0 to 1, so that
    small gains look small. Returns the (closed) figure, so that its axes can be read back."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, name in ((ax_acc, "acc"), (ax_loss, "loss")):
        for split, style, color in (("train", "o-", "tab:blue"), ("val", "s-", "tab:orange")):
            column = f"{split}/{name}"
            if column not in joined:
                continue
            for _, rows in joined.groupby("phase", sort=False):
                rows = rows[rows[column].notna()]
                kept, thrown = rows[rows["kept"]], rows[~rows["kept"]]
                if len(kept):  # (an empty line outside the clip box would collapse the layout)
                    ax.plot(kept["epoch"], kept[column], style, color=color, markersize=3, clip_on=False,
                            label=split)
                if len(thrown):  # from the last kept point on, so the line shows where the discarded epochs began
                    tail = pd.concat([kept.tail(1), thrown])
                    ax.plot(tail["epoch"], tail[column], style[0] + ":", color=color, alpha=0.35, markersize=3,
                            markerfacecolor="none", clip_on=False, label=THROWN)
        column = f"val/{name}"
        if column in joined:
            handed = joined[joined["handed_on"].astype(bool) & joined[column].notna()]
            if len(handed):
                ax.plot(handed["epoch"], handed[column], "D", color="black", markersize=6, zorder=3, clip_on=False,
                        label="handed on")
        for position, label in boundaries:  # names upright along the line: short phases would overlap
            ax.axvline(position, color="grey", linestyle="--", linewidth=0.8)
            ax.text(position, 0.98, f" {label}", transform=ax.get_xaxis_transform(), va="top", ha="right",
                    rotation=90, fontsize=8)
        epoch_axis(ax, joined["epoch"])
        ax.set_xlabel("epochs trained (all phases)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))  # one entry per label
        order = [label for label in ("train", "val", THROWN, "handed on") if label in handles]
        if order:
            ax.legend([handles[label] for label in order], order, fontsize=8)
    ax_acc.set_ylim(0.0, 1.0)
    losses = [float(v) for c in ("train/loss", "val/loss") if c in joined for v in joined[c] if v == v]
    if losses:
        ax_loss.set_ylim(0.0, max(max(losses) * 1.1, 1e-3))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _run_rows(runs: list[tuple[str, str | os.PathLike | None]], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """pipeline.json's row of each run: its summary's PIPELINE_KEYS, or why the pipeline did not run it."""
    rows = []
    for phase, run_dir in runs:
        if run_dir is None:
            rows.append({"phase": phase, "run_dir": None, "skipped": skipped.get(phase, True)})
            continue
        summary = read_summary(run_dir, missing_ok=True)  # None: the phase never started
        rows.append({"phase": phase, "run_dir": str(run_dir),
                     **{key: getattr(summary, key, None) for key in PIPELINE_KEYS}})
    return rows


def write_pipeline_report(phases_dir: str | os.PathLike, runs: list[tuple[str, str | os.PathLike | None]],
                          title: str = "", skipped: dict[str, str] | None = None,
                          refit: list[tuple[str, str | os.PathLike | None]] | None = None,
                          final_checkpoint: str | None = None, soup: list[str] | None = None) -> Path:
    """``<phases_dir>/curves.png`` (all phases, boundaries marked) and ``pipeline.json`` (run dirs, results; the
    phases the pipeline skipped, with why; the refit runs, the checkpoints the final one averages, and the
    checkpoint the pipeline ends with)."""
    phases_dir = Path(phases_dir)
    phases_dir.mkdir(parents=True, exist_ok=True)
    joined, boundaries = join_phases(runs)
    if len(joined):
        plot_pipeline(joined, boundaries, phases_dir / "curves.png", title=title or "pipeline")
    report: dict[str, Any] = {"phases": _run_rows(runs, skipped or {})}
    if refit:
        report["refit"] = _run_rows(refit, {p: "takes no step: hands its predecessor's refit on"
                                            for p, d in refit if d is None})
    if soup:
        report["soup"] = soup
    if final_checkpoint:
        report["final_checkpoint"] = final_checkpoint
    write_json(phases_dir / PIPELINE_FILE, report)
    return phases_dir / "curves.png"
