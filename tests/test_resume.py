"""A resumed run is the run it continues: every schedule in conf/scheduler and a phase run, resumed from the
checkpoints a stop after epoch 2 of 5 leaves, end as the run that never stopped (carnet/training/resume.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from carnet.artifacts import read_metrics, read_summary
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH

# Everything in summary.json that says what the run did (not where or how long).
RESULT_KEYS = ["status", "epochs_run", "best_epoch", "best_val_loss", "best_val_acc", "phase", "init_from",
               "start_val_loss", "start_val_acc", "kept_start", "unfrozen_fraction", "trainable_params"]


def network(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = network(a), network(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("case", ["plateau", "cosine", "cyclic", "onecycle", "phase"])
def test_a_resumed_run_ends_as_the_run_that_never_stopped(case: str, tiny_data: Path, tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    """One run of 5 epochs, whose checkpoints folder is copied as a kill after epoch 2 leaves it; the copy's
    last.ckpt resumed into a new folder gives the same metrics.csv (lr included), summary, best.ckpt and, for a
    phase (unfreeze_half from init_from), the same start and hand-off. plateau cut the rate an epoch late: the
    checkpoint is written before Lightning's epoch-end plateau step, which a resumed run never took."""
    chosen = (["phase=unfreeze_half", f"init_from={tiny_checkpoint}"] if case == "phase"  # at its 64 px
              else [f"scheduler={case}", "image_size=32"])
    common = [*ONE_BATCH, f"data.root={tiny_data}", "trainer.max_epochs=5", "logger=none", *chosen]
    full, stopped, resumed = tmp_path / "full", tmp_path / "stopped", tmp_path / "resumed"
    copy = f"+callbacks.stop={{_target_:tests.helpers.stops.CopyCheckpoints,epoch:1,to:{stopped}}}"
    train(compose_cfg([*common, copy, f"run_dir={full}", f"paths.output_dir={full}"]))
    train(compose_cfg([*common, f"resume={stopped / 'last.ckpt'}", f"run_dir={resumed}",
                       f"paths.output_dir={resumed}"]))

    expected, got = read_metrics(full), read_metrics(resumed)
    assert expected["lr"].iloc[2:].nunique() > 1  # the schedule moves after the stop, so a wrong step would show
    pd.testing.assert_frame_equal(got.drop(columns="seconds"), expected.drop(columns="seconds"), rtol=1e-5)
    summaries = [read_summary(run) for run in (full, resumed)]
    assert [{key: s.get(key) for key in RESULT_KEYS} for s in summaries[1:]] == \
           [{key: summaries[0].get(key) for key in RESULT_KEYS}]
    assert_same_weights(full / "checkpoints" / "best.ckpt", resumed / "checkpoints" / "best.ckpt")
    if case == "phase":
        assert summaries[1]["init_from"] == str(tiny_checkpoint) and summaries[1]["start_val_loss"] is not None
        assert_same_weights(full / "phases" / "unfreeze_half.ckpt", resumed / "phases" / "unfreeze_half.ckpt")
        assert not (resumed / "checkpoints" / "start.ckpt").exists()  # brought along, then removed as it ends
