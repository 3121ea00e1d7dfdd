"""What a resume needs beyond Lightning's checkpoint, so that ``resume=last.ckpt`` continues the run it stopped:

- (randomness per epoch is no resume matter: every run seeds each epoch from (seed, epoch, rank),
  :mod:`carnet.training.seeding`, so the resumed epochs draw what an uninterrupted run draws);
- the epoch-end ReduceLROnPlateau step: Lightning takes it after ``last.ckpt`` is written and never takes it for
  the checkpoint's epoch when resuming, so the checkpoint carries the value it needs and the resumed run takes it;
- Lightning's CSV log (``csv/metrics.csv``): its logger starts a resumed run's file empty (and deletes one in its
  folder), so the history up to the checkpoint is written back first;
- ``resume=auto`` and a cluster's requeue: which checkpoint a run in a folder holding a stopped run continues
  (:func:`continue_in_place`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import CSVLogger

from carnet.errors import CarnetError
from carnet.models.checkpoint import CHECKPOINT_KEY
from carnet.models.files import load_weights_only
from carnet.summary import RunSummary, read_summary
from carnet.training.phases import check_fits

log = logging.getLogger(__name__)

AUTO = "auto"  # resume=auto: continue the unfinished run in this run's own folder, if there is one
# Keys that may differ between a run and the one that continues it in the same folder.
_NOT_THE_RUN = ("resume", "run_dir")


def scheduler_job_id() -> str | None:
    """The cluster job this process runs in, an id a requeued job keeps: SLURM's (``sbatch``, the submitit_slurm
    launcher) or submitit's local executor's (submitit_local). None outside such a job.

    Read from the environment the scheduler sets, rather than ``submitit.JobEnvironment``, so that a plain
    ``sbatch --requeue`` job counts too and submitit stays optional."""
    for variable in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(variable):
            return f"{variable}={os.environ[variable]}"
    return None


def continue_in_place(cfg: DictConfig, run_dir: Path) -> RunSummary | None:
    """Decide what a run continues when its folder may already hold a stopped run of it; set ``cfg.resume``.

    A run continues the stopped run in its own folder from that run's ``checkpoints/last.ckpt`` (the epochs it
    finished are kept, the one it stopped in runs again) when asked to (``resume=auto``), or when it is a requeue of
    the cluster job that left that run unfinished: same :func:`scheduler_job_id` and the same config (submitit and
    SLURM requeue a preempted or timed-out job with the same arguments, hence into the same folder).

    With ``resume=auto``: no ``last.ckpt`` means a fresh start; a run of another config stops with the keys that
    differ; a run that already completed is left as it is, its summary is returned and nothing is trained.

    Every DDP rank decides alike: what it reads (``last.ckpt``, the run's config, job id and whether it completed)
    is what rank 0 leaves in place while the others decide.
    """
    summary = read_summary(run_dir, missing_ok=True)
    status, job_id = (summary.status, summary.job_id) if summary is not None else (None, None)
    last = run_dir / "checkpoints" / "last.ckpt"
    if str(cfg.get("resume") or "") == AUTO:
        with open_dict(cfg):
            cfg.resume = None
        if summary is not None and status == "completed":
            log.info("resume=auto: the run in %s already completed; nothing to train", run_dir)
            return summary
        if not last.is_file():
            log.info("resume=auto: no stopped run to continue in %s (no checkpoints/last.ckpt): a new run starts",
                     run_dir)
            return None
        if differences := _config_differences(run_dir / "config.yaml", cfg):
            raise CarnetError(f"resume=auto: {run_dir} holds a stopped run of another config ({'; '.join(differences)})"
                              ": continue it with its own config, or give this run its own folder (hydra.run.dir=DIR)")
    else:
        job = scheduler_job_id()
        requeued = (job is not None and job_id == job and status != "completed"
                    and last.is_file() and not _config_differences(run_dir / "config.yaml", cfg))
        if not requeued:
            return None  # resume=PATH, or a fresh run, as given
    with open_dict(cfg):
        cfg.resume = str(last)
    log.info("continuing the stopped run in %s from %s", run_dir, last)
    return None


def _config_differences(saved: Path, cfg: DictConfig, shown: int = 3) -> list[str]:
    """``key: theirs -> mine`` for the keys (dotted) in which ``cfg`` differs from the run config saved in ``saved``
    (``config.yaml``, resolved), except those of :data:`_NOT_THE_RUN`; at most ``shown`` of them and a count."""
    if not saved.is_file():
        return []
    theirs = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    mine = _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in theirs.keys() | mine.keys()
                  if k.split(".", 1)[0] not in _NOT_THE_RUN and theirs.get(k) != mine.get(k))
    rows = [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in keys[:shown]]
    return rows + ([f"{len(keys) - shown} more"] if len(keys) > shown else [])


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def check_resumable(path: str | Path, model_name: str, head: Any, num_classes: int) -> None:
    """A one-line error, before anything is built, for a ``resume=`` that cannot continue this run: a missing or
    unreadable file, one holding pickled objects (refused), a weights-only checkpoint (``best.ckpt``, a phase
    hand-off) that has no optimizer state to continue from, or the checkpoint of another model, head or class count
    (Lightning would fail on mis-sized tensors once the model is built)."""
    path = Path(path)
    if not path.is_file():
        raise CarnetError(f"resume={path}: file not found (expected a run's checkpoints/last.ckpt)")
    # mmap: only the keys are read, not gigabytes of tensors
    checkpoint = load_weights_only(path, f"resume={path}", mmap=True)
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CarnetError(f"resume={path} is not a carnet checkpoint (no '{CHECKPOINT_KEY}' metadata): expected a "
                          "run's checkpoints/last.ckpt")
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CarnetError(f"resume={path} holds weights only (a best.ckpt or a phase hand-off): resume from the run's "
                          "checkpoints/last.ckpt, or start a new run from these weights with init_from=PATH")
    check_fits(checkpoint, path, model_name, head, num_classes, key="resume")


class ResumeState(pl.Callback):
    """Takes the plateau step a checkpoint was written before, and continues Lightning's CSV log, when a run
    resumes."""

    def __init__(self, resume: str | None = None) -> None:
        self.resume = resume  # the checkpoint a resumed run continues
        self.csv_history: dict[int, pd.DataFrame] = {}
        self.trainer: pl.Trainer | None = None
        self.saved: dict[str, Any] = {}  # this callback's part of the checkpoint a run resumes from

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        if self.resume and trainer.is_global_zero:
            # Now: Lightning's CSV writer deletes a metrics.csv in its folder when it starts (a resume in place).
            self.csv_history = read_csv_logs(trainer, Path(self.resume))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for index, history in self.csv_history.items():
            writer = trainer.loggers[index].experiment
            rows = history[history["step"] <= checkpoint.get("global_step", 0)].to_dict("records")
            writer.metrics = [{k: v for k, v in row.items() if pd.notna(v)} for row in rows]
            writer.save()
        self.csv_history = {}

    def state_dict(self) -> dict[str, Any]:
        """Written into every checkpoint: its epoch, and the values its epoch-end plateau steps read.

        Lightning steps epoch-interval ReduceLROnPlateau schedulers in the fit loop's ``on_advance_end``, after the
        ``on_train_epoch_end`` hooks in which ModelCheckpoint writes ``last.ckpt``; and a resumed run never takes
        that step (Lightning #14699: the monitored value is not in the checkpoint). Without it the resumed run's
        plateau counts one epoch fewer and cuts the rate an epoch late.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        monitored = {config.monitor: float(trainer.callback_metrics[config.monitor])
                     for config in _epoch_plateaus(trainer) if config.monitor in trainer.callback_metrics}
        return {"epoch": trainer.current_epoch, "monitored": monitored}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run takes the plateau steps of the checkpoint's epoch, once, before its first batch.

        Only when the checkpoint was written in the epoch before the one this run starts with: Lightning then never
        steps for that epoch. (A checkpoint written after the step, e.g. at an interruption, is in the next epoch.)
        """
        saved, self.saved = self.saved, {}
        epoch = saved.get("epoch")
        if epoch is None or trainer.current_epoch != epoch + 1:
            return
        for config in _epoch_plateaus(trainer):
            value = saved.get("monitored", {}).get(config.monitor)
            if value is not None and (epoch + 1) % config.frequency == 0:  # Lightning's own condition
                pl_module.lr_scheduler_step(config.scheduler, value)


def _epoch_plateaus(trainer: pl.Trainer) -> list[Any]:
    """The trainer's ReduceLROnPlateau schedulers stepped at the end of an epoch (Lightning's scheduler configs)."""
    return [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == "epoch"]


def read_csv_logs(trainer: pl.Trainer, checkpoint: Path) -> dict[int, pd.DataFrame]:
    """The CSV log of the run a resume continues, for each of ``trainer``'s CSV loggers (by index): read from the
    checkpoint's run directory (``<run>/checkpoints/last.ckpt``), at the place the logger has in this run's."""
    checkpoint_run_dir = checkpoint.resolve().parent.parent
    run_dir = Path(trainer.default_root_dir).resolve()
    histories = {}
    for index, logger in enumerate(trainer.loggers):
        if isinstance(logger, CSVLogger):
            previous = checkpoint_run_dir / Path(logger.log_dir).resolve().relative_to(run_dir) / "metrics.csv"
            if previous.is_file():
                histories[index] = pd.read_csv(previous)
    return histories
