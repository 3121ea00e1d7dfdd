"""Every photo trains the final model (issue 21 item 1): ``refit`` retrains on train + validation photos for the
length validation chose, and summary.json says which photos trained the weights a run ends with."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console

from carnet.errors import RefitError
from carnet.models.checkpoint import CHECKPOINT_KEY, load_checkpoint, read_checkpoint
from carnet.summary import RunSummary, read_summary
from carnet.training.pipeline import run_pipeline
from carnet.training.refit import REFIT_DIR, refit_steps
from carnet.training.soup import SOUP_FILE, soup_members
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import ONE_BATCH, TINY


def test_a_refit_repeats_the_share_of_its_plan_at_which_its_selection_was_best() -> None:
    """Epochs count from 1: best epoch 3 of 10 one-step epochs is 30 % of the plan; a refit planning 20 steps (more
    photos) takes 6 of them. A selection that kept its start (epoch 0) leaves nothing to repeat."""
    selection = RunSummary(best_epoch=3, steps_per_epoch=1, planned_steps=10, kept_start=False)
    assert refit_steps(selection, 20) == 6
    assert refit_steps(RunSummary(best_epoch=10, steps_per_epoch=1, planned_steps=10), 20) == 20
    assert refit_steps(RunSummary(best_epoch=0, steps_per_epoch=1, planned_steps=10, kept_start=True), 20) == 0


def test_a_plain_run_with_refit_trains_again_on_every_photo(tiny_data: Path, tmp_path: Path) -> None:
    """refit=true: the run chooses its best epoch on validation, then <run>/refit trains on every photo, without
    validation, for the same share of its plan, and its summary says so."""
    run = tmp_path / "run"
    summary = train(compose_cfg([*TINY, f"data.root={tiny_data}", "trainer.max_epochs=2", "data.verify=false",
                                 "trainer.num_sanity_val_steps=0", "scheduler=cosine", "refit=true",
                                 f"run_dir={run}"]))
    assert summary.status == "completed" and summary.trained_on == "train" and summary.num_val > 0
    refit = read_summary(run / REFIT_DIR)
    assert refit.status == "completed" and refit.trained_on == "train+val" and refit.refit_from == str(run)
    assert (refit.num_train, refit.num_val) == (summary.num_train + summary.num_val, 0)
    assert set(pd.read_csv(run / REFIT_DIR / "split.csv").split) == {"train"}
    assert refit.refit_steps == refit_steps(summary, refit.planned_steps) > 0
    assert refit.taken_steps == refit.refit_steps
    assert refit.best_val_loss is None  # nothing validated
    best = torch.load(run / REFIT_DIR / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(run / REFIT_DIR / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())  # its last weights


def test_refit_on_a_single_phase_run_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(RefitError, match=r"refit=true on phase run head: .*carnet-pipeline refit=true"):
        train(compose_cfg([*TINY, "phase=head", "refit=true", f"run_dir={tmp_path / 'run'}"]))


def test_refit_with_a_schedule_that_reads_validation_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(RefitError, match=r"refit with scheduler=plateau: .*val/acc stalls.*scheduler=cosine"):
        train(compose_cfg([*TINY, "refit=true", f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_a_refit_of_an_unfinished_run_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(RefitError, match=r"no summary\.json there"):
        train(compose_cfg([*TINY, "scheduler=cosine", f"refit_from={tmp_path / 'nothing'}",
                           f"run_dir={tmp_path / 'run'}"]))


@pytest.mark.slow
def test_the_pipeline_skips_after_a_kept_start_and_refits_the_chain(tiny_data: Path, tmp_path: Path) -> None:
    """unfreeze_half at lr 0 (BatchNorm frozen) keeps its start, so unfreeze_3q is skipped (it hands that start
    on); the refit chain fits the head again on every photo and hands it on through the phases that took no step."""
    folder = tmp_path / "pipe"
    run_pipeline([f"data.root={tiny_data}", *TINY, "data.verify=false", "trainer.num_sanity_val_steps=0",
                  "head_fit.views=0", f"paths.output_dir={tmp_path}",
                  "refit=true", "pipeline.skip_after_kept_start=true", "unfreeze_half:optimizer.lr=0"],
                 ["head", "unfreeze_half", "unfreeze_3q"], console=Console(file=io.StringIO()), folder=folder)
    report = json.loads((folder / "pipeline.json").read_text())
    phases = {row["phase"]: row for row in report["phases"]}
    assert phases["unfreeze_half"]["kept_start"] is True
    assert phases["unfreeze_3q"]["run_dir"] is None and "kept its start" in phases["unfreeze_3q"]["skipped"]
    assert (folder / "phases" / "unfreeze_3q.ckpt").read_bytes() == (folder / "phases" / "unfreeze_half.ckpt") \
        .read_bytes()
    refit = {row["phase"]: row for row in report["refit"]}
    assert refit["head"]["trained_on"] == "train+val" and refit["unfreeze_half"]["run_dir"] is None
    head = read_summary(refit["head"]["run_dir"])
    assert head.head_fit["photos"] == head.num_train == phases_photos(phases["head"]["run_dir"])
    assert report["final_checkpoint"] == str(folder / "refit" / "unfreeze_3q.ckpt") and "soup" not in report  # one end
    assert (folder / "refit" / "unfreeze_3q.ckpt").read_bytes() == (folder / "refit" / "head.ckpt").read_bytes()


def test_the_pipeline_ends_with_the_average_of_the_phase_ends_that_trained(tiny_data: Path, tmp_path: Path) -> None:
    """Both phases fit a head, so both train and are refitted: the final checkpoint is soup.ckpt, each weight the
    mean of the two refitted ends (integer buffers and everything inference reads from the last), and it loads. An
    end at another image size (finetune_448's) stays out of the soup."""
    folder = tmp_path / "pipe"
    run_pipeline([f"data.root={tiny_data}", *ONE_BATCH, "head_fit.views=0", f"paths.output_dir={tmp_path}",
                  "unfreeze_half:head_fit.enabled=true"], ["head", "unfreeze_half"],
                 console=Console(file=io.StringIO()), folder=folder)
    report = json.loads((folder / "pipeline.json").read_text())
    members = [folder / "refit" / "head.ckpt", folder / "refit" / "unfreeze_half.ckpt"]
    assert report["soup"] == [str(m) for m in members] and report["final_checkpoint"] == str(folder / SOUP_FILE)
    head, half = (read_checkpoint(m) for m in members)
    soup = read_checkpoint(folder / SOUP_FILE)
    assert soup[CHECKPOINT_KEY] == half[CHECKPOINT_KEY]
    differ = 0
    for key, value in soup["state_dict"].items():
        if value.is_floating_point():
            assert torch.allclose(value, (head["state_dict"][key] + half["state_dict"][key]) / 2, atol=1e-6), key
            differ += not torch.equal(head["state_dict"][key], half["state_dict"][key])
        else:
            assert torch.equal(value, half["state_dict"][key]), key
    assert differ > 0  # two different networks: the soup is a third one
    load_checkpoint(folder / SOUP_FILE)
    larger = tmp_path / "finetune_448.ckpt"
    torch.save({**half, CHECKPOINT_KEY: {**half[CHECKPOINT_KEY], "image_size": 448}}, larger)
    assert list(soup_members([*members, larger])) == [larger] and list(soup_members([larger, *members])) == members


def phases_photos(run_dir: str) -> int:
    """Every photo of a selection run: those that trained and those that validated."""
    summary = read_summary(run_dir)
    return summary.num_train + summary.num_val


def test_at_kaggle_scale_the_refit_plans_a_quarter_more_steps_and_the_head_fit_a_tenth_of_its_phase() -> None:
    """The competition: 12,449 photos train and 3,112 validate; a refit trains on all 15,561. Per phase, the steps
    the selection run plans and the most its refit can take (its whole plan, when the last epoch was the best);
    the head fit's forward passes (``head_fit.max_images``) against those of its phase's epoch."""
    from carnet.training.budget import plan_budget
    from carnet.training.head_fit import capped_images, plan_images

    planned = {}
    for phase in ("head", "unfreeze_half", "unfreeze_3q", "unfreeze_all", "finetune_448"):
        selection, refit = compose_cfg([f"phase={phase}"]), compose_cfg([f"phase={phase}"])
        batch = selection.data.batch_size
        planned[phase] = (plan_budget(selection, 12_449, batch)["planned_steps"],
                          plan_budget(refit, 15_561, batch)["planned_steps"])
    assert planned["head"] == (389, 486)
    assert planned["unfreeze_half"] == planned["unfreeze_3q"] == planned["unfreeze_all"] == (1945, 2430)
    assert planned["finetune_448"] == (1167, 1458)
    cfg = compose_cfg(["phase=head"])
    photos, views = plan_images(12_449, cfg.head_fit.views, capped_images(cfg.head_fit.max_images, cfg.model.scales))
    assert photos * views <= 0.1 * (12_449 + 3_112)  # the head phase's one epoch: every photo trained + validated
