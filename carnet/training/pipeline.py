"""The fine-tuning recipe in one command: each phase of conf/phase as its own ``train.py`` run, in order.

    carnet-pipeline [--phases head,unfreeze_half,...] [OVERRIDE ...] [PHASE:OVERRIDE ...]

An ``OVERRIDE`` (Hydra syntax, e.g. ``data.root=DIR model=tf_efficientnet_lite0``) goes to every phase; one
prefixed with a phase name goes to that phase only (``finetune_448:data.image_size=300``). Each phase starts
from the previous one's best weights through ``${paths.phases}/<phase>.ckpt`` (the phases' ``init_from``), exactly
as when the commands are typed one by one. Afterwards ``${paths.phases}/curves.png`` shows all phases on one
epoch axis and ``${paths.phases}/pipeline.json`` lists their runs and results.

Why subprocesses: every phase is then literally ``carnet-train phase=NAME ...`` (fresh Hydra state, its own run
directory, nothing carried over in memory that the hand-off through checkpoints would not carry).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from rich.console import Console

from carnet.config import config_dir
from carnet.training.phases import PIPELINE_FILE, write_pipeline_report

PHASES = ["head", "unfreeze_half", "unfreeze_3q", "unfreeze_all", "finetune_448"]


def split_overrides(args: list[str], phases: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every phase, and ``PHASE:override`` ones per phase."""
    common, per_phase = [], {p: [] for p in phases}
    for arg in args:
        head, sep, rest = arg.partition(":")
        if sep and head in per_phase and "=" in rest:
            per_phase[head].append(rest)
        else:
            common.append(arg)
    return common, per_phase


def phases_dir_of(overrides: list[str]) -> Path:
    """``paths.phases`` as train.py will resolve it with these overrides."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[o for o in overrides if not o.lstrip("+~").startswith("hydra.")])
    return Path(cfg.paths.phases)


def run_pipeline(overrides: list[str], phases: list[str] | None = None, console: Console | None = None) -> Path:
    """Run ``phases`` in order; return ``${paths.phases}``. A failing phase stops the pipeline (SystemExit)."""
    console = console or Console()
    phases = list(phases or PHASES)
    available = sorted(p.stem for p in (config_dir() / "phase").glob("*.yaml"))
    unknown = [p for p in phases if p not in available]
    if unknown:
        raise SystemExit(f"--phases: unknown phase(s) {unknown}; conf/phase has {available}")
    common, per_phase = split_overrides(overrides, phases)
    phases_dir = phases_dir_of(common)
    root = phases_dir.parent / "pipeline" / time.strftime("%Y-%m-%d_%H-%M-%S")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    runs: list[tuple[str, Path]] = []
    for i, phase in enumerate(phases, 1):
        run_dir = root / f"{i}-{phase}"
        command = [sys.executable, "-m", "carnet.training.train", f"phase={phase}", *common, *per_phase[phase],
                   f"hydra.run.dir={run_dir}"]
        console.rule(f"[bold]phase {i}/{len(phases)}: {phase}")
        console.print(" ".join(command[1:]), style="dim", soft_wrap=True)
        runs.append((phase, run_dir))
        code = subprocess.call(command, env=env)
        write_pipeline_report(phases_dir, runs, title=" → ".join(p for p, _ in runs))
        if code != 0:
            raise SystemExit(f"pipeline stopped: phase {phase} failed (exit {code}); its run directory is {run_dir}. "
                             f"Fix it, then rerun from there with --phases {','.join(phases[i - 1:])}")
    console.rule("[bold]pipeline done")
    console.print(f"{phases_dir / PIPELINE_FILE}, {phases_dir / 'curves.png'}")
    return phases_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carnet-pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="e.g. carnet-pipeline data.root=data model=tf_efficientnet_lite0 "
                                            "finetune_448:data.image_size=300")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated phases to run in order (default: {','.join(PHASES)})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every phase, or PHASE:override for one")
    args = parser.parse_args(argv)
    phases_dir = run_pipeline(args.overrides, [p for p in args.phases.split(",") if p])
    for row in json.loads((phases_dir / PIPELINE_FILE).read_text())["phases"]:
        acc = row["best_val_acc"]
        print(f"{row['phase']:>14}: best val/acc={acc:.4f}" if acc is not None else f"{row['phase']:>14}: -")


if __name__ == "__main__":
    main()
