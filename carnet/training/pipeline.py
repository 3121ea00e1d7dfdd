"""The fine-tuning recipe in one command: each phase of conf/phase as its own ``train.py`` run, in the order their
``init_from`` chains them (:func:`phase_order`).

    carnet-pipeline [--phases head,unfreeze_half,...] [--dir FOLDER] [OVERRIDE ...] [PHASE:OVERRIDE ...]

An ``OVERRIDE`` (Hydra syntax, e.g. ``data.root=DIR model=tf_efficientnet_lite0``) goes to every phase; one
prefixed with a phase name goes to that phase only (``finetune_448:image_size=300``). Everything a pipeline
writes stays in its own folder, ``<paths.output_dir>/pipeline/<time>/`` (or ``--dir``): each phase's run directory
``<i>-<phase>/``, and ``phases/<phase>.ckpt``, through which each phase starts from the previous one's best weights
(the phases' ``init_from``, with ``paths.phases`` set to that folder), exactly as when the commands are typed one
by one. Afterwards ``curves.png`` there shows all phases on one epoch axis and ``pipeline.json`` lists their runs
and results. ``--dir`` of a stopped pipeline with ``--phases`` from the failed phase on resumes it.

A phase that fails stops the pipeline with exit status 1; one interrupted (Ctrl-C, or SIGTERM sent to the pipeline,
which passes it on to the phase) stops it with the phase's own status (130, 143). Either way the last line says
how to continue.

Why a process per phase: every phase is then literally ``carnet-train phase=NAME ...`` (fresh Hydra state, its own
run directory, nothing carried over in memory that the hand-off through checkpoints would not carry). The pipeline
forks it from its own process, which imported carnet-train once, so no phase waits for the imports again
(carnet.training.phase_process; ``pipeline.fork_phases=false`` starts each in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from carnet.config import config_dir, one_line_config_error
from carnet.config_check import check_train_config
from carnet.errors import CarnetError, ConfigError, PhaseError, exit_on_error
from carnet.training import cli
from carnet.training.chain import (
    REFIT_FOLDER,
    final_checkpoint,
    hand_on,
    phases_dir_of,
    refit_command,
    refit_on,
    refit_plan,
    skipped_after,
    trained_ends,
    without,
)
from carnet.training.phase_process import start_phase
from carnet.training.phases import PIPELINE_FILE, resolve_init_from, write_pipeline_report
from carnet.training.soup import SOUP_FILE, soup_members, write_soup


def phase_order() -> list[str]:
    """The phases of conf/phase that chain by ``init_from`` (each starts from the one before), first to last.

    Read from the phase configs, the one place that says which phase starts from which: a phase added to the chain
    joins the pipeline. A phase that starts from nothing and that no phase starts from (``progressive``, the
    whole recipe in one run) is not in it.
    """
    starts_from = {p.stem: OmegaConf.load(p).get("init_from") for p in sorted((config_dir() / "phase").glob("*.yaml"))}
    following: dict[str, str] = {}
    for phase, before in starts_from.items():
        if before and following.setdefault(before, phase) != phase:
            raise CarnetError(f"conf/phase: {following[before]} and {phase} both start from {before} (init_from): "
                              "the pipeline needs one chain of phases")
    firsts = [phase for phase, before in starts_from.items() if not before and phase in following]
    if len(firsts) != 1:
        raise CarnetError(f"conf/phase: expected one chain of phases linked by init_from, found {len(firsts)} "
                          f"starting from nothing ({', '.join(firsts) or 'none'})")
    order = firsts
    while order[-1] in following and following[order[-1]] not in order:
        order.append(following[order[-1]])
    return order


def split_overrides(args: list[str], phases: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every phase, and ``PHASE:override`` ones per phase. One for a phase of conf/phase that is not
    run is left out, so that a resumed pipeline (``--phases`` from the failed one on) takes the same overrides."""
    common, per_phase = [], {p: [] for p in phases}
    known = {p.stem for p in (config_dir() / "phase").glob("*.yaml")}
    for arg in args:
        head, sep, rest = arg.partition(":")
        if sep and head in per_phase and "=" in rest:
            per_phase[head].append(rest)
        elif not (sep and head in known and "=" in rest):
            common.append(arg)
    return common, per_phase


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def compose_common(overrides: list[str]) -> DictConfig:
    """The training config as train.py composes it with these overrides (Hydra's own keys left out). A mistyped
    option or key is a :class:`ConfigError` in the one line train.py would say, not Hydra's traceback."""
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=[o for o in overrides if not _key(o).startswith("hydra.")])
    except (ConfigCompositionException, OverrideParseException) as err:
        raise ConfigError(one_line_config_error(err)) from None


def check_phases(commands: list[tuple[str, Path, list[str]]]) -> list[DictConfig]:
    """Every phase's config, composed and checked (carnet.config_check) as its run will, before the first starts:
    a value typed wrong, for every phase or with ``PHASE:``, stops the pipeline in one line with nothing written,
    not once the phases before it have trained. Returns the configs, in the commands' order."""
    configs = []
    for phase, _, command in commands:
        try:
            configs.append(compose_common([arg for arg in command[3:] if "=" in arg]))
            check_train_config(configs[-1])
        except ConfigError as err:
            raise ConfigError(f"phase {phase}: {err}") from None
    return configs


def next_index(folder: Path) -> int:
    """The number of the next run folder (``<i>-<phase>``): after those already in ``folder`` (a resumed pipeline)."""
    numbers = [int(p.name.split("-", 1)[0]) for p in folder.glob("*-*") if p.name.split("-", 1)[0].isdigit()] \
        if folder.is_dir() else []
    return max(numbers, default=0) + 1


def plan_pipeline(overrides: list[str], phases: list[str], folder: str | os.PathLike | None = None,
                  ) -> tuple[Path, list[tuple[str, Path, list[str]]]]:
    """The pipeline's folder and, per phase, ``(phase, run dir, command)``.

    Everything a pipeline writes stays in its folder (``<paths.output_dir>/pipeline/<time>``, or ``folder``): its
    phases' run directories ``<i>-<phase>``, and the hand-off checkpoints in ``phases/`` (``paths.phases`` of every
    phase), so a pipeline never overwrites the ``${paths.phases}`` of single runs or of another pipeline. A
    ``paths.phases=`` override of the user's wins.
    """
    common, per_phase = split_overrides(overrides, phases)
    if folder is None:
        folder = Path(compose_common(common).paths.output_dir) / "pipeline" / time.strftime("%Y-%m-%d_%H-%M-%S")
    folder = Path(folder)
    given = [*common, *(o for extra in per_phase.values() for o in extra)]
    hand_off = [] if any(_key(o) == "paths.phases" for o in given) else [f"paths.phases={folder / 'phases'}"]
    commands = []
    for i, phase in enumerate(phases, next_index(folder)):
        run_dir = folder / f"{i}-{phase}"
        # refit is the pipeline's to run once every phase has chosen (carnet.training.chain), not each phase's
        commands.append((phase, run_dir, cli.command(f"phase={phase}", *without(common, "refit", "refit_from"),
                                                     *hand_off, *without(per_phase[phase], "refit", "refit_from"),
                                                     f"hydra.run.dir={run_dir}")))
    return folder, commands


def check_start(phases: list[str], cfg: DictConfig) -> None:
    """The first phase's ``init_from`` must be in the pipeline's folder: a pipeline that starts after the head phase
    (``--phases unfreeze_all,...``) continues an earlier one, whose folder ``--dir`` names. Without it the folder
    is new and holds no hand-off, and the phase would fail once started; this says so first, naming the folder
    that holds the checkpoint. ``cfg``: the first phase's config (:func:`check_phases`)."""
    init_from = cfg.get("init_from")
    if not init_from:
        return
    try:
        resolve_init_from(init_from, cfg.paths.phases)
    except PhaseError:
        pass
    else:
        return
    name, phase = str(init_from), phases[0]
    holders = sorted(Path(cfg.paths.output_dir).glob(f"pipeline/*/phases/{name}.ckpt"), key=lambda p: p.stat().st_mtime)
    where = (f"continue the pipeline that ran it (the latest with phases/{name}.ckpt): carnet-pipeline --dir "
             f"{holders[-1].parent.parent} --phases {','.join(phases)} and the same overrides") if holders else \
        "no pipeline folder holds it yet"
    raise SystemExit(f"pipeline: phase {phase} starts from init_from={name}, and {cfg.paths.phases}/{name}.ckpt "
                     f"does not exist: {where}; or start with --phases {name}, or give {phase}:init_from=PATH.ckpt")


def earlier_runs(folder: Path, phases: list[str]) -> list[tuple[str, Path]]:
    """The runs a resumed pipeline keeps from its folder's pipeline.json: those of phases it does not rerun."""
    path = folder / PIPELINE_FILE
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("phases", [])
    return [(row["phase"], Path(row["run_dir"]) if row.get("run_dir") else None) for row in rows
            if row["phase"] not in phases]


def run_phase(command: list[str], env: dict[str, str], fork: bool = True) -> int:
    """Run one phase's command (forked from this process when ``fork`` allows, carnet.training.phase_process) and
    return its exit status, passing a SIGTERM sent to the pipeline on to it.

    A scheduler that preempts the pipeline (Kubernetes signals the main process only) then gets the phase's own
    ending: an ``interrupted`` run with a whole ``last.ckpt``. Ctrl-C reaches the phase from the terminal (same
    process group), so the pipeline ignores its own copy and waits for the phase's verdict.
    """
    child = start_phase(command, env, fork=fork)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return child.wait()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupting_signal(code: int) -> signal.Signals | None:
    """The signal a phase's exit status reports: train's own 130 (Ctrl-C) or 143 (SIGTERM), or -N for a process
    that signal N killed outright (SIGKILL, the OOM killer); None for a failure."""
    if code < 0:
        return signal.Signals(-code)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return signal.Signals(code - 128)
    return None


def stop(what: str, code: int, run_dir: Path, after_failure: str, after_interruption: str) -> NoReturn:
    """End carnet-pipeline at a run that did not complete: exit 1 saying what failed, or the signal's own status
    (128 + n) when a signal interrupted it; either way the last line says how to go on."""
    if (signum := interrupting_signal(code)) is None:
        raise SystemExit(f"pipeline stopped: {what} failed (exit {code}); its run directory is {run_dir}. "
                         f"{after_failure}")
    print(f"pipeline stopped: {what} was interrupted by {signum.name}; its run directory is {run_dir}. "
          f"{after_interruption}", file=sys.stderr)
    raise SystemExit(128 + signum)


def run_pipeline(overrides: list[str], phases: list[str] | None = None, console: Console | None = None,
                 folder: str | os.PathLike | None = None) -> Path:
    """Run ``phases`` in order (:func:`plan_pipeline`); return the pipeline's folder. A failed or interrupted phase
    stops the pipeline: SystemExit, with the command that continues it (status 1, or the interrupted phase's)."""
    console = console or Console()
    phases = list(phases or phase_order())
    available = sorted(p.stem for p in (config_dir() / "phase").glob("*.yaml"))
    unknown = [p for p in phases if p not in available]
    if unknown:
        raise SystemExit(f"--phases: unknown phase(s) {unknown}; conf/phase has {available}")
    common, per_phase = split_overrides(overrides, phases)
    settings = compose_common(common)  # refit and pipeline.*
    folder, commands = plan_pipeline(overrides, phases, folder)
    check_start(phases, check_phases(commands)[0])
    phases_dir = phases_dir_of(folder, [*common, *(o for extra in per_phase.values() for o in extra)])
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    runs = earlier_runs(folder, phases)
    skipped: dict[str, str] = {}
    console.print(f"pipeline folder: {folder} (a stopped pipeline continues with --dir {folder} and --phases from "
                  "the phase that stopped)", soft_wrap=True)
    for i, (phase, run_dir, command) in enumerate(commands):
        console.rule(f"[bold]phase {i + 1}/{len(commands)}: {phase}")
        if phase in skipped:
            source = next(p for p, d in reversed(runs) if d is not None)
            hand_on(phases_dir, source, phase)
            console.print(f"skipped: {skipped[phase]}; hands on {source}'s weights")
            runs.append((phase, None))
            write_pipeline_report(folder, runs, title=" → ".join(p for p, _ in runs), skipped=skipped)
            continue
        console.print(" ".join(command[1:]), style="dim", soft_wrap=True, markup=False)
        runs.append((phase, run_dir))
        code = run_phase(command, env, settings.pipeline.fork_phases)
        write_pipeline_report(folder, runs, title=" → ".join(p for p, _ in runs), skipped=skipped)
        if code == 0:
            for later in skipped_after(phase, run_dir, phases[i + 1:], settings):
                skipped[later] = f"{phase} kept its start (pipeline.skip_after_kept_start)"
            continue
        resume = f"carnet-pipeline --dir {folder} --phases {','.join(phases[i:])} and the same overrides"
        stop(f"phase {phase}", code, run_dir, f"Fix it, then resume with: {resume}", f"Continue with: {resume}")
    refit_runs = run_refit(folder, phases_dir, runs, common, per_phase, env, console,
                           settings.pipeline.fork_phases) if refit_on(settings) else None
    ends_dir = folder / REFIT_FOLDER if refit_runs else phases_dir
    final = final_checkpoint(ends_dir, runs[-1][0])
    soup = soup_members(trained_ends(runs, ends_dir)) if settings.pipeline.soup else []
    if len(soup) > 1:  # one member is the final checkpoint itself
        final = write_soup(soup, folder / SOUP_FILE)
    write_pipeline_report(folder, runs, title=" → ".join(p for p, _ in runs), skipped=skipped, refit=refit_runs,
                          final_checkpoint=str(final), soup=[str(m) for m in soup] if len(soup) > 1 else None)
    console.rule("[bold]pipeline done")
    console.print(f"final weights: {final}" + (" (refitted on every photo)" if refit_runs else "")
                  + (f", the average of {', '.join(m.stem for m in soup)}" if len(soup) > 1 else ""))
    console.print(f"{folder / PIPELINE_FILE}, {folder / 'curves.png'}; runs and hand-offs (phases/) in {folder}")
    return folder


def run_refit(folder: Path, phases_dir: Path, runs: list[tuple[str, Path | None]], common: list[str],
              per_phase: dict[str, list[str]], env: dict[str, str], console: Console,
              fork: bool = True) -> list[tuple[str, Path | None]]:
    """The chain again on every photo, each phase for the length its selection run chose
    (carnet.training.chain); a failed or interrupted refit stops the pipeline as a failed phase does."""
    refit_phases = folder / REFIT_FOLDER
    done: list[tuple[str, Path | None]] = []
    plan = refit_plan(runs)
    for i, (phase, selection) in enumerate(plan):
        console.rule(f"[bold]refit {i + 1}/{len(plan)}: {phase} on every photo")
        if selection is None:  # hands on its predecessor's refit; the first phase, its own start (no photo trained it)
            source, source_dir = (done[-1][0], None) if done else (phase, phases_dir)
            hand_on(refit_phases, source, phase, source_dir=source_dir)
            console.print("takes no step (its selection run kept its start, or was skipped): hands on "
                          + (f"the refit of {source}" if done else "that start, which trained on no photo"))
            done.append((phase, None))
            continue
        run_dir = folder / f"{next_index(folder)}-refit-{phase}"
        command = refit_command(phase, selection, run_dir, refit_phases, common, per_phase.get(phase, []))
        console.print(" ".join(command[1:]), style="dim", soft_wrap=True, markup=False)
        done.append((phase, run_dir))
        code = run_phase(command, env, fork)
        if code == 0:
            continue
        resume = f"carnet-pipeline --dir {folder} --phases {','.join(p for p, _ in runs)} and the same overrides"
        stop(f"the refit of {phase}", code, run_dir, f"Fix it, then run the pipeline again: {resume}",
             f"Run the pipeline again with: {resume}")
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carnet-pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="e.g. carnet-pipeline data.root=data model=tf_efficientnet_lite0 "
                                            "finetune_448:image_size=300")
    order = ",".join(phase_order())
    parser.add_argument("--phases", default=order,
                        help=f"comma-separated phases to run in order (default: {order}, conf/phase's init_from chain)")
    parser.add_argument("--dir", default=None, help="the pipeline's folder (default: <paths.output_dir>/pipeline/"
                        "<time>); a stopped pipeline's folder resumes it, with --phases from the failed one")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every phase, or PHASE:override for one")
    args = parser.parse_args(argv)
    with exit_on_error("pipeline"):
        folder = run_pipeline(args.overrides, [p for p in args.phases.split(",") if p], folder=args.dir)
    report = json.loads((folder / PIPELINE_FILE).read_text())
    for row in report["phases"]:
        acc, epoch = row.get("best_val_acc"), row.get("best_epoch")
        handed = "its start" if epoch == 0 else f"epoch {epoch}"
        print(f"{row['phase']:>14}: handed on {handed}, val/acc={acc:.4f}" if acc is not None
              else f"{row['phase']:>14}: {'skipped' if row.get('skipped') else '-'}")
    print(f"final weights: {report.get('final_checkpoint')}")


if __name__ == "__main__":
    main()
