"""Training: config -> DataModule, LightningModule, callbacks -> Trainer -> a run directory.

:func:`train` is what the ``carnet-train`` command (carnet.training.cli, ``train.py`` at the top level) runs.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from carnet.artifacts import SPLIT_FILE
from carnet.config import overrides_of, run_dir_of
from carnet.config_check import check_train_config
from carnet.data.corrections import read_corrections
from carnet.data.layout import scan_train
from carnet.errors import RunInterrupted, note_scheduler_signal, scheduler_exit_status, stopping_signal
from carnet.models.hub import check_pretrained_available
from carnet.runtime import resolve_runtime
from carnet.summary import RunSummary
from carnet.training.budget import plan_budget
from carnet.training.builders import build_callbacks, build_datamodule, build_module, build_trainer
from carnet.training.console import log_to_files, quiet_lightning
from carnet.training.finite import StopOnNonFinite
from carnet.training.refit import REFIT_DIR, Refit, check_refit, refit_config, wants_plain_refit
from carnet.training.resume import check_resumable, continue_in_place, scheduler_job_id
from carnet.training.run_dir import RunArtifacts, run_dir_lock
from carnet.training.stopping import early_stopping
from carnet.training.tune import tune


def train(cfg: DictConfig) -> RunSummary:
    """Train one run as configured; return its summary (also written to ``<run dir>/summary.json``).

    The run owns its directory while it runs (:func:`run_dir_lock`), and the directory gets a summary whatever
    happens: ``failed`` with the reason for a failure before training (bad data, bad weights) as during it, and
    ``interrupted`` for Ctrl-C or SIGTERM, which then raise :class:`carnet.errors.RunInterrupted` (exit 130, 143).
    A value the user typed wrong is refused before that: no run starts, nothing is written (carnet.config_check).
    With ``resume=auto``, or as a cluster's requeue of its job, it continues the stopped run its folder holds
    (:func:`continue_in_place`).
    """
    check_train_config(cfg)
    check_refit(cfg)  # refused like a value typed wrong: before the run exists
    run_dir = run_dir_of(cfg)
    as_typed = cfg.copy()  # _train plans the budget into cfg; a refit plans its own on every photo
    is_rank_zero = rank_zero_only.rank == 0  # DDP re-runs this script on every rank: files from rank 0 only
    with run_dir_lock(run_dir) if is_rank_zero else nullcontext(), signals_stop_the_run():
        if (completed := continue_in_place(cfg, run_dir)) is not None:
            return completed
        facts = RunSummary(run_dir=str(run_dir), model=cfg.model.name, image_size=int(cfg.image_size),
                           head=cfg.head.get("_target_", "").rsplit(".", 1)[-1], seed=int(cfg.seed),
                           data_root=str(cfg.data.root), overrides=overrides_of(cfg),
                           resumed_from=cfg.get("resume") or None, job_id=scheduler_job_id())
        artifacts = RunArtifacts(run_dir, facts, monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode)
        if is_rank_zero:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            artifacts.start()
        try:
            summary = _train(cfg, run_dir, artifacts, is_rank_zero)
        except BaseException as err:
            signum = stopping_signal(err)
            if is_rank_zero:
                artifacts.fail(err)
                log_to_files(f"run interrupted by {signum.name}" if signum is not None
                             else f"run failed: {type(err).__name__}: {err}", logging.ERROR)
            if signum is None:
                raise
            raise RunInterrupted(_how_to_continue(run_dir, signum), signum, scheduler_exit_status(err)) from err
    if wants_plain_refit(cfg) and summary.status == "completed":  # refit=true: every photo trains the final weights
        print(f"refit on every photo: {run_dir / REFIT_DIR}")
        train(refit_config(as_typed, run_dir))
    return summary


def _how_to_continue(run_dir: Path, signum: signal.Signals) -> str:
    """The one line an interrupted run ends with: how to continue it from its last whole epoch."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return (f"interrupted by {signum.name}; continue the run with the same overrides plus resume={last} "
                "(the epoch that was cut short is trained again)")
    return f"interrupted by {signum.name} before its first epoch ended (no last.ckpt yet): run it again"


@contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """SIGTERM (how SLURM and Kubernetes preempt) stops the run as Ctrl-C does, at any moment of it; a scheduler's
    own preemption signal (SIGUSR1/SIGUSR2, e.g. submitit's, whose handler requeues the job and exits) is noted, so
    that the run ends ``interrupted``, not ``failed``.

    Inside ``trainer.fit`` Lightning's own handler runs first: it notes the signal and stops at the end of the
    batch (``SIGTERMException``), and this one, which it calls after its own, leaves that to it. Before ``fit``
    (data checks, building the model, a download) and after it, Python's default would kill the process and leave
    ``summary.json`` saying ``running``: this raises Lightning's exception there, once.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    raised = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal raised
        if signal.getsignal(signal.SIGTERM) is stop and not raised:  # not inside fit, not already stopping
            raised = True
            raise SIGTERMException()

    def noting(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
        def note_then_handle(signum: int, frame: Any) -> Any:
            note_scheduler_signal(signum)
            return handler(signum, frame)

        return note_then_handle

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
    for other in (signal.SIGUSR1, signal.SIGUSR2):
        if callable(handler := signal.getsignal(other)):  # a scheduler's handler, installed before the run
            previous[other] = signal.signal(other, noting(handler))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(cfg: DictConfig, run_dir: Path, artifacts: RunArtifacts, is_rank_zero: bool) -> RunSummary:
    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in config.yaml; no "Seed set" line
    # Cheap checks first: the data folder's layout (a directory listing) before a model is built or downloaded.
    scan_train(cfg.data.root, len(cfg.data.class_names))
    if cfg.data.get("corrections"):  # the file's own mistakes (actions, classes); its paths are matched at setup
        read_corrections(cfg.data.corrections, list(cfg.data.class_names))
    if cfg.get("resume"):
        check_resumable(cfg.resume, cfg.model.name, cfg.head, len(cfg.data.class_names))
    if cfg.model.pretrained and not cfg.model.get("weights"):
        check_pretrained_available(cfg.model.name)  # offline: one line in a second, not a minute of retries
    refit = Refit.from_config(cfg)  # refit_from=RUN: this run trains every photo for RUN's chosen length
    runtime = resolve_runtime(cfg)  # every `auto`, once, for the device the Trainer will train on
    artifacts.summary.update(resolved=runtime.summary())  # what ran, for the user: also in a failed run's summary
    callbacks = build_callbacks(cfg)  # a missing or mismatching predecessor phase fails before any build
    module = build_module(cfg, runtime)
    datamodule = build_datamodule(cfg, module, runtime)
    module.provenance = {"run_dir": str(run_dir.resolve()), "data_root": str(datamodule.root.resolve())}
    datamodule.setup("fit")
    if refit is not None:
        refit.prepare(cfg, datamodule)  # every photo trains; no validation
    if is_rank_zero:
        datamodule.write_split(run_dir / SPLIT_FILE)
    if cfg.get("tune"):  # `tune=lr_find`: search a learning rate on this config, do not train
        result = tune(cfg, module, datamodule, run_dir, runtime, callbacks)
        if is_rank_zero:  # the finder's curve stays in its own file (tune.py's lr_find.json): numbers only here
            artifacts.finish(tune={k: v for k, v in result.items() if not isinstance(v, list | tuple | dict)})
        return artifacts.summary
    counts = datamodule.split.split.value_counts()
    budget = plan_budget(cfg, int(counts.get("train", 0)), datamodule.batch_size, runtime.world_size)
    artifacts.summary.update(
        data_root=str(datamodule.root), num_train=int(counts.get("train", 0)), num_val=int(counts.get("val", 0)),
        num_excluded=len(datamodule.excluded),  # photos left out as unreadable (data.verify)
        **datamodule.data_summary(),  # extra_sources, fold, num_folds, num_dedup_excluded, corrections
        **budget,
        trained_on="train",  # which photos trained the weights it ends with; a refit (Refit) says train+val
    )
    artifacts.best_checkpoint = run_dir / "checkpoints" / "best.ckpt"
    guard = StopOnNonFinite(lr=cfg.optimizer.get("lr"))
    stopping = early_stopping(cfg, budget["steps_per_epoch"])  # after the phase: it counts from the phase's start
    if refit is not None:
        refit.plan(budget["planned_steps"])
        stopping.append(refit)
    # artifacts last: it records what the others did
    trainer = build_trainer(cfg, run_dir, [*callbacks, *stopping, guard, artifacts], runtime)
    with warnings.catch_warnings():
        if cfg.get("resume") and Path(cfg.resume).parent.resolve() == (run_dir / "checkpoints").resolve():
            # A run continued in its own folder finds its checkpoints there, as it should.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume") or None)

    summary = artifacts.summary
    if is_rank_zero and (line := result_line(summary)) is not None:
        print(line)
        log_to_files(line)
    return summary


def result_line(summary: RunSummary) -> str | None:
    """The line a run ends with: best.ckpt's epoch and scores, and why that epoch (``monitor``); the highest val/acc
    too when another epoch had it, since the two are easily taken for each other."""
    if summary.best_val_acc is None:
        return None
    which = f"{'lowest' if summary.monitor_mode == 'min' else 'highest'} {summary.monitor}"
    line = (f"best.ckpt: epoch {summary.best_epoch} of {summary.epochs_run} ({which}), "
            f"val/acc={summary.best_val_acc:.4f} val/loss={summary.best_val_loss:.4f}")
    if summary.kept_start:
        line = (f"best.ckpt: epoch 0, the phase's start (no epoch of {summary.epochs_run} beat its {summary.monitor}), "
                f"val/acc={summary.best_val_acc:.4f} val/loss={summary.best_val_loss:.4f}")
    if summary.max_val_acc is not None and summary.max_val_acc_epoch != summary.best_epoch \
            and summary.max_val_acc > summary.best_val_acc:
        line += f"; highest val/acc {summary.max_val_acc:.4f} at epoch {summary.max_val_acc_epoch}"
    return line
