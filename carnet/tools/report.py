"""Compare runs: ``carnet-report DIR`` (a sweep's folder, or any folder of run directories).

Reads every ``summary.json`` + ``metrics.csv`` under DIR (carnet/artifacts.py's contract, never a logger's
files), prints a table sorted by ``best_val_acc`` with the overrides that differ between runs, and writes
``DIR/report.md`` and ``DIR/report.png`` (val accuracy per epoch of every run, named by its differing overrides,
the best one highlighted).
Failed, interrupted and still-running runs are listed with their status, below the ranked ones.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from carnet.artifacts import read_metrics, write_text_atomic
from carnet.plots import accuracy_axis, epoch_axis
from carnet.summary import SUMMARY_FILE, RunSummary, read_summary

REPORT_MD, REPORT_PNG = "report.md", "report.png"
# Overrides that name where a run lives, not what it tried: never a column.
IGNORED_KEYS = ("hydra.", "run_dir", "paths.", "data.root", "trainer.enable_progress_bar")


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    name: str
    summary: RunSummary
    metrics: pd.DataFrame
    overrides: dict[str, str] = field(default_factory=dict)
    unreadable: bool = False  # summary.json could not be read (the reason is in summary.error)

    @property
    def status(self) -> str:
        return "unreadable" if self.unreadable else self.summary.status

    @property
    def best_val_acc(self) -> float | None:
        """The summary's best val/acc; for a run without one yet (running, failed), the best epoch so far."""
        value = self.summary.best_val_acc
        if value is None and "val/acc" in self.metrics and self.metrics["val/acc"].notna().any():
            value = float(self.metrics["val/acc"].max())
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["optimizer=sgd", "+x=1", "~y"]`` -> ``{"optimizer": "sgd", "x": "1", "y": "<deleted>"}``."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        parsed[key] = value if sep else "<deleted>"
    return parsed


def find_runs(root: str | os.PathLike) -> list[Run]:
    """Every run under ``root`` (``root`` itself included): each directory holding a summary.json."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a sweep folder (multirun/DATE/TIME) or a "
                                "folder of run directories")
    runs = []
    for summary_path in sorted(root.rglob(SUMMARY_FILE)):
        run_dir = summary_path.parent
        try:
            summary, unreadable = read_summary(run_dir), False
        except ValueError as err:  # a damaged or newer file is reported, not fatal: the other runs still compare
            summary, unreadable = RunSummary(error=str(err)), True
        name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
        runs.append(Run(run_dir, name, summary, read_metrics(run_dir), parse_overrides(summary.overrides),
                        unreadable))
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (a key missing from some runs differs too)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys and not k.startswith(IGNORED_KEYS)]
    return [k for k in keys if len({run.overrides.get(k, "") for run in runs}) > 1]


def rank_runs(runs: list[Run]) -> list[Run]:
    """Completed runs by best_val_acc (best first), then every other run (by accuracy so far, then name)."""
    def key(run: Run) -> tuple[int, float, str]:
        acc = run.best_val_acc
        return (0 if run.status == "completed" else 1, -(acc if acc is not None else -1.0), run.name)

    return sorted(runs, key=key)


def report_frame(runs: list[Run]) -> pd.DataFrame:
    """The report table: one row per run, ranked, with the differing overrides as columns."""
    keys = differing_keys(runs)
    rows = []
    for rank, run in enumerate(rank_runs(runs), start=1):
        s = run.summary
        rows.append({
            "rank": rank, "run": run.name, "status": run.status, "best_val_acc": run.best_val_acc,
            "best_epoch": s.best_epoch, "epochs": len(run.metrics) if run.unreadable else s.epochs_run,
            "seconds": round(s.seconds) if s.seconds is not None else None,
            **{k: run.overrides.get(k, "") for k in keys},
        })
    frame = pd.DataFrame(rows, columns=["rank", "run", "status", "best_val_acc", "best_epoch", "epochs", "seconds",
                                        *keys])
    # whole numbers stay whole when some runs have none (pandas would make the column float)
    return frame.astype({"best_epoch": "Int64", "epochs": "Int64", "seconds": "Int64"})


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def optuna_result(root: Path) -> str | None:
    """One line about an Optuna sweep's best trial (hydra-optuna-sweeper's optimization_results.yaml), if any."""
    path = root / "optimization_results.yaml"
    if not path.is_file():
        return None
    result = yaml.safe_load(path.read_text()) or {}
    params = " ".join(f"{k}={v}" for k, v in (result.get("best_params") or {}).items())
    return f"Optuna best value {result.get('best_value')}: {params}"


def _num_classes(run: Run) -> int | None:
    """The run's class count, from its config.yaml (summary.json does not hold it)."""
    try:
        names = (yaml.safe_load((run.path / "config.yaml").read_text()) or {}).get("data", {}).get("class_names")
    except (OSError, yaml.YAMLError):
        return None
    return len(names) if names else None


def noise_note(runs: list[Run]) -> str | None:
    """What the ranking cannot tell, in a sentence: the best run at chance level, or the best two apart by less
    than their accuracies' sampling noise on the validation photos they were measured on.

    A validation accuracy p on n photos has a standard error of sqrt(p(1-p)/n); two runs' accuracies differ within
    noise when the difference is under twice the standard error of a difference, sqrt(p1(1-p1)/n + p2(1-p2)/n)
    (about 95 %). The same seed validates every run on the same photos, so this errs on the cautious side.
    """
    ranked = [r for r in rank_runs(runs) if r.status == "completed" and r.best_val_acc is not None
              and r.summary.num_val]
    if not ranked:
        return None
    best, n = ranked[0], int(ranked[0].summary.num_val)
    p1 = best.best_val_acc
    notes = []
    classes = _num_classes(best)
    if classes:
        chance = 1 / classes
        if p1 <= chance + 2 * math.sqrt(chance * (1 - chance) / n):
            notes.append(f"the best run ({p1:.4f}) is not above chance level ({classes} classes: {chance:.4f}) by "
                         f"more than the noise of {n} validation photos")
    if len(ranked) > 1:
        second = ranked[1]
        n = min(n, int(second.summary.num_val))
        p2 = second.best_val_acc
        variance = p1 * (1 - p1) + p2 * (1 - p2)
        margin = 2 * math.sqrt(variance / n)
        gap = p1 - p2
        if gap < margin:
            needed = f"about {math.ceil(4 * variance / gap ** 2):,} validation photos would tell them apart" \
                if gap > 0 else "they are tied"
            notes.append(f"the best two runs ({best.name}: {p1:.4f}, {second.name}: {p2:.4f}) differ by {gap:.4f}, "
                         f"less than the noise of {n} validation photos (2 standard errors: {margin:.4f}); {needed}")
    return "Within noise: " + "; ".join(notes) + "." if notes else None


def to_markdown(frame: pd.DataFrame, title: str, note: str | None = None) -> str:
    """A GitHub-flavoured markdown table (hand-written: pandas' to_markdown needs the extra `tabulate`)."""
    lines = [f"# {title}", "", f"{len(frame)} runs, best first; failed or unfinished runs last.", "",
             *([note, ""] if note else []),
             "| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + f"\n\n![val accuracy per epoch]({REPORT_PNG})\n"


def run_label(run: Run, keys: list[str]) -> str:
    """A run named by what it tried: its values of the overrides that differ between runs (else its folder)."""
    tried = " ".join(f"{k}={run.overrides[k]}" for k in keys if k in run.overrides)
    return tried or run.name


def plot_runs(runs: list[Run], path: str | os.PathLike, title: str = "") -> Figure:
    """Val accuracy per epoch of every run, named by its differing overrides; the best completed run bold and first
    in the legend. Whole epochs, accuracy up to 1 (carnet.artifacts' axis rules, as in a run's curves.png).
    Returns the (closed) figure, so that its axes can be read back."""
    ranked = rank_runs(runs)
    best = ranked[0] if ranked and ranked[0].best_val_acc is not None else None
    keys = differing_keys(runs)
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    handles, epochs, accs = {}, [], []
    for run in reversed(ranked):  # best drawn last, on top
        metrics = run.metrics
        if "val/acc" not in metrics or not metrics["val/acc"].notna().any():
            continue
        label = f"{run_label(run, keys)} ({_cell(run.best_val_acc)})" + (
            "" if run.status == "completed" else f" [{run.status}]")
        if run is best:
            (handles[run.name],) = ax.plot(metrics["epoch"], metrics["val/acc"], "o-", color="tab:red", linewidth=2.5,
                                           markersize=5, label=f"best: {label}", zorder=3, clip_on=False)
        else:
            (handles[run.name],) = ax.plot(metrics["epoch"], metrics["val/acc"], marker="o", markersize=4, linewidth=1,
                                           alpha=0.7, linestyle="-" if run.status == "completed" else ":",
                                           label=label, clip_on=False)
        epochs += list(metrics["epoch"])
        accs += list(metrics["val/acc"])
    epoch_axis(ax, epochs)
    accuracy_axis(ax, accs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val/acc")
    ax.grid(alpha=0.3)
    if handles:  # best first, then in rank order
        ax.legend(handles=[handles[r.name] for r in ranked if r.name in handles], fontsize=7, loc="best",
                  ncol=1 if len(handles) <= 12 else 2)
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def print_table(frame: pd.DataFrame, title: str, console: Console | None = None) -> None:
    """The report as a rich table on the terminal: best row green, failed ones red."""
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(column, justify="right" if column in ("rank", "best_val_acc", "best_epoch", "epochs",
                                                               "seconds") else "left")
    for i, row in enumerate(frame.itertuples(index=False)):
        status = row.status
        style = "bold green" if i == 0 and status == "completed" else (
            "red" if status in ("failed", "interrupted", "unreadable") else ("yellow" if status != "completed"
                                                                             else None))
        table.add_row(*(_cell(v) for v in row), style=style)
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: no terminal width to fit, keep columns readable
            console = Console(width=200)
    console.print(table)


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 console: Console | None = None) -> pd.DataFrame:
    """Find, rank, print and write the report of every run under ``root``; return the table."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs under {root}: no {SUMMARY_FILE} found in it or its subfolders")
    out_dir = Path(out_dir) if out_dir else root
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = report_frame(runs)
    title = f"carnet runs in {root}"
    note = "\n\n".join(n for n in (optuna_result(root), noise_note(runs)) if n) or None
    print_table(frame, title, console)
    if note:
        (console or Console()).print(note, soft_wrap=True)
    write_text_atomic(out_dir / REPORT_MD, to_markdown(frame, title, note))
    plot_runs(runs, out_dir / REPORT_PNG, title=title)
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carnet-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a sweep folder (multirun/DATE/TIME) or any folder of run directories")
    parser.add_argument("--out", default=None, help="where report.md and report.png go (default: DIR)")
    args = parser.parse_args(argv)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; expected a folder for {REPORT_MD} and {REPORT_PNG}")
    try:
        frame = write_report(args.dir, args.out)
    except OSError as err:  # ours (no runs) says what it means; the system's names the file it could not write
        print(f"error: {f'cannot write {err.filename} ({err.strerror})' if err.strerror else err}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dir)
    print(f"{len(frame)} runs; wrote {out / REPORT_MD} and {out / REPORT_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
