"""What carnet-pipeline decides between its phases: which phases to skip, the refit chain, and which phase ends
its final weights average (carnet.training.soup).

* **Skipping** (``pipeline.skip_after_kept_start``): once an unfreezing phase keeps its start (no epoch beat it on
  validation), the unfreezing phases after it are not run; each hands the same weights on (its ``<phase>.ckpt`` is
  a copy), so a later phase that names it in ``init_from`` (``finetune_448``) starts where the chain stood.
* **Refit** (``refit``, carnet/training/refit.py): once every phase has chosen, the chain runs again on every photo,
  each phase for the share of its plan its selection run chose, into ``<pipeline>/refit/`` (hand-offs) and
  ``<i>-refit-<phase>/`` (runs). A phase whose selection run kept its start, or that was skipped, takes no step: it
  hands on its predecessor's refit (the first phase: its start, which no photo trained), except a phase that fits its
  head (``head``), which fits it again on every photo.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from carnet.artifacts import atomic_path
from carnet.summary import read_summary
from carnet.training import cli

# The phases that unfreeze more of the same network at the same size: a kept start skips the rest of them.
UNFREEZING = ("unfreeze_half", "unfreeze_3q", "unfreeze_all")
REFIT_FOLDER = "refit"


def refit_on(settings: DictConfig) -> bool:
    """``refit`` for carnet-pipeline: true and auto refit the chain, false does not."""
    return settings.refit in (True, "auto")


def skipped_after(phase: str, run_dir: Path, remaining: list[str], settings: DictConfig) -> list[str]:
    """The phases of ``remaining`` to skip because ``phase`` (just run in ``run_dir``) kept its start."""
    if phase not in UNFREEZING or not settings.pipeline.skip_after_kept_start:
        return []
    summary = read_summary(run_dir, missing_ok=True)
    return [p for p in remaining if p in UNFREEZING] if summary is not None and summary.kept_start else []


def hand_on(phases_dir: Path, source: str, target: str, source_dir: Path | None = None) -> Path:
    """``<phases_dir>/<target>.ckpt`` as a copy of ``<source>.ckpt`` (in ``source_dir``, by default the same
    folder): a phase that is not run hands on its start."""
    path = phases_dir / f"{target}.ckpt"
    with atomic_path(path) as tmp:
        shutil.copyfile((source_dir or phases_dir) / f"{source}.ckpt", tmp)
    return path


def without(overrides: list[str], *keys: str) -> list[str]:
    """``overrides`` without those setting ``keys`` (the pipeline sets them itself)."""
    return [o for o in overrides if o.partition("=")[0].lstrip("+~") not in keys]


def refit_plan(selection: list[tuple[str, Path | None]]) -> list[tuple[str, Path | None]]:
    """Per selection phase in order, the selection run a refit repeats, or None: the phase takes no step and hands
    its predecessor's refit on (it was skipped, or kept its start and fits no head)."""
    plan = []
    for phase, run_dir in selection:
        summary = read_summary(run_dir, missing_ok=True) if run_dir is not None else None
        takes_steps = summary is not None and (bool(summary.head_fit) or not summary.kept_start)
        plan.append((phase, run_dir if takes_steps else None))
    return plan


def refit_command(phase: str, selection_dir: Path, run_dir: Path, refit_phases: Path, common: list[str],
                  own: list[str]) -> list[str]:
    """The train command that refits ``phase`` on every photo, following ``selection_dir``'s length."""
    keys = ("paths.phases", "refit", "refit_from", "hydra.run.dir")
    return cli.command(f"phase={phase}", *without(common, *keys), *without(own, *keys),
                       f"paths.phases={refit_phases}", f"refit_from={selection_dir}", f"hydra.run.dir={run_dir}")


def final_checkpoint(ends_dir: Path, last_phase: str) -> Path:
    """The last phase's end in ``ends_dir`` (the refit's hand-offs, else the phases'): without a soup, the
    checkpoint the pipeline ends with."""
    return ends_dir / f"{last_phase}.ckpt"


def trained_ends(selection: list[tuple[str, Path | None]], ends_dir: Path) -> list[Path]:
    """The ends in ``ends_dir`` of the phases that trained, in order (those a refit repeats: :func:`refit_plan`)."""
    return [final_checkpoint(ends_dir, phase) for phase, run_dir in refit_plan(selection) if run_dir is not None]


def phases_dir_of(folder: Path, overrides: list[str]) -> Path:
    """Where the selection phases hand off: the pipeline's ``phases/``, or a ``paths.phases=`` of the user's."""
    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == "paths.phases"]
    return Path(given[-1]) if given else folder / "phases"
