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
    proc = run_script("train.py", f"data.root={tiny_data}", *overrides, "trainer.max_epochs=2",
                      "trainer.num_sanity_val_steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    output = proc.stdout + proc.stderr
    epochs = re.findall(r"^(epoch (\d)/2: train/loss [\d.]+  train/acc [\d.]+  val/loss [\d.]+  val/acc ([\d.]+)  "
                        r"\(([\d.]+) s\))$", proc.stdout, flags=re.MULTILINE)
    assert [epoch for _, epoch, _, _ in epochs] == ["1", "2"], output
    # One numbering and one clock: the lines are metrics.csv's rows (epochs from 1, that epoch's seconds), and
    # summary.json's best epoch is the console's; train.log holds the same lines and the result.
    run_dir = tmp_path / "run"
    metrics, summary = read_metrics(run_dir), read_summary(run_dir)
    assert [(int(e), float(acc), float(s)) for _, e, acc, s in epochs] == [
        (r.epoch, round(r["val/acc"], 4), round(r.epoch_seconds, 1)) for _, r in metrics.iterrows()]
    assert f"best.ckpt: epoch {summary.best_epoch} of 2" in proc.stdout and summary.best_epoch in (1, 2)
    log = (run_dir / "train.log").read_text()
    assert all(line in log for line, _, _, _ in epochs) and f"best.ckpt: epoch {summary.best_epoch} of 2" in log
    assert "━" not in output and "\x1b[" not in output  # no progress bar drawn into a file
    assert "Trainable params" in output and "FLOPs" not in output  # the summary, without an empty FLOPs column
    for noise in ("litlogger", "LeafSpec", "Seed set to", "logging interval"):
        assert noise not in output, noise


def test_the_progress_bar_on_a_terminal_counts_epochs_from_1_too(tmp_path: Path) -> None:
    """On a terminal the Rich bar replaces the epoch lines: it says "Epoch 1/25" for the first of 25 (Lightning's
    own says "Epoch 0/24")."""
    bar = QuietProgressBar()
    trainer = pl.Trainer(callbacks=[bar], max_epochs=25, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    bar.setup(trainer, pl.LightningModule(), "fit")
    assert [bar._get_train_description(epoch).strip() for epoch in (0, 24)] == ["Epoch 1/25", "Epoch 25/25"]
