"""What a run prints without a terminal (logs, CI, nohup): one line per epoch, a plain model summary, no adverts."""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl

from carnet.artifacts import read_metrics
from carnet.summary import read_summary
from carnet.training.console import QuietProgressBar
from tests.helpers.overrides import TINY
from tests.helpers.runs import run_script


def test_a_run_without_a_terminal_prints_one_line_per_epoch(tiny_data: Path, tmp_path: Path) -> None:
    overrides = [o for o in TINY if not o.startswith(("trainer.enable_progress_bar", "trainer.enable_model_summary"))]
    run = tmp_path / "run"
    proc = run_script("train.py", f"data.root={tiny_data}", *overrides, "trainer.max_epochs=2",
                      "trainer.num_sanity_val_steps=0", "data.cache=memory", f"hydra.run.dir={run}")
    output = proc.stdout + proc.stderr
    epochs = re.findall(r"^(epoch (\d)/2: train/loss [\d.]+  train/acc [\d.]+  val/loss [\d.]+  val/acc ([\d.]+)  "
                        r"\(([\d.]+) s\))$", proc.stdout, flags=re.MULTILINE)
    assert [epoch for _, epoch, _, _ in epochs] == ["1", "2"], output
    # One numbering and one clock: the lines are metrics.csv's rows (epochs from 1, that epoch's seconds), and
    # summary.json's best epoch is the console's; train.log holds the same lines and the result.
    run_dir = tmp_path / "run"
    metrics, summary = read_metrics(run_dir), read_summary(run_dir)
    assert [(int(e), float(acc)) for _, e, acc, _ in epochs] == [
        (r.epoch, round(r["val/acc"], 4)) for _, r in metrics.iterrows()]
    # The line shows the epoch's seconds to 0.1, metrics.csv to 0.01: 13.95 may print as 13.9 or 14.0.
    shown = [float(s) for _, _, _, s in epochs]
    assert all(abs(s - r.epoch_seconds) <= 0.05 + 1e-6 for s, (_, r) in zip(shown, metrics.iterrows(), strict=True))
    assert f"best.ckpt: epoch {summary.best_epoch} of 2" in proc.stdout and summary.best_epoch in (1, 2)
    log = (run_dir / "train.log").read_text()
    assert all(line in log for line, _, _, _ in epochs) and f"best.ckpt: epoch {summary.best_epoch} of 2" in log
    assert "━" not in output and "\x1b[" not in output  # no progress bar drawn into a file
    assert "Trainable params" in output and "FLOPs" not in output  # the summary, without an empty FLOPs column
    for noise in ("litlogger", "LeafSpec", "Seed set to", "logging interval",
                  # issue 23 item 7: Lightning noting carnet's own summary callback, accelerators this machine lacks,
                  # the stepping-batches estimate, an empty FLOPs total
                  "already configured with model summary", "GPU available: False", "TPU available",
                  "estimate number of stepping batches", "Total Flops"):
        assert noise not in output, noise
    assert output.count("image cache:") == 1, output  # the whole split, said once (was once per loader)
    assert "\n\n" not in proc.stdout  # no blank line left by a progress bar that was never drawn
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"run folder: {run}" and lines[-1].startswith(f"run folder: {run} (")  # where to look


def test_the_progress_bar_on_a_terminal_counts_epochs_from_1_too(tmp_path: Path) -> None:
    """On a terminal the Rich bar replaces the epoch lines: it says "Epoch 1/25" for the first of 25 (Lightning's
    own says "Epoch 0/24")."""
    bar = QuietProgressBar()
    trainer = pl.Trainer(callbacks=[bar], max_epochs=25, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    bar.setup(trainer, pl.LightningModule(), "fit")
    assert [bar._get_train_description(epoch).strip() for epoch in (0, 24)] == ["Epoch 1/25", "Epoch 25/25"]
