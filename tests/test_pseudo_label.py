"""The head fit learns from the unlabelled test photos it is sure of (``head_fit.pseudo_label``, issue 21)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from carnet.training.head_fit import fit_head, self_train, sure_photos
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


def test_sure_photos_are_those_above_the_threshold() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.2, 0.8]])
    sure, labels = sure_photos(probs, 0.85)
    assert sure.tolist() == [0, 2] and labels.tolist() == [0, 1]
    assert len(sure_photos(probs, 0.99)[0]) == 0


def clusters(photos_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 20-d features around fixed centres, with noise wide enough that 3 labelled photos a class
    place the boundaries badly."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 1.2
    y = torch.arange(3).repeat_interleave(photos_per_class)
    return centres[y] + torch.randn(len(y), 20, generator=gen), y


def test_self_training_adds_the_sure_unlabelled_photos_and_helps_on_them() -> None:
    x, y = clusters(3, seed=1)
    pool, truth = clusters(200, seed=2)
    unlabelled = torch.stack([pool, pool + 0.05 * torch.randn_like(pool)])  # two views of each photo
    groups = np.arange(len(y))
    plain_w, plain_b, _ = fit_head(x, y, groups, 3, folds=3)
    weight, bias, info = self_train(x, y, groups, unlabelled, 3, threshold=0.9, folds=3)
    assert info["unlabelled"] == 600 and 0 < info["pseudo_labelled"] <= 600
    plain = ((pool @ plain_w.t() + plain_b).argmax(1) == truth).float().mean()
    taught = ((pool @ weight.t() + bias).argmax(1) == truth).float().mean()
    assert taught > plain


def test_nothing_sure_leaves_the_labelled_fit() -> None:
    x, y = clusters(3, seed=1)
    unlabelled = torch.zeros(2, 5, 20)  # every class equally likely: nothing passes 0.9
    fit = fit_head(x, y, np.arange(len(y)), 3, folds=3)
    weight, bias, info = self_train(x, y, np.arange(len(y)), unlabelled, 3, threshold=0.9, folds=3)
    assert info["pseudo_labelled"] == 0 and torch.equal(weight, fit[0]) and torch.equal(bias, fit[1])


def run_head(data: Path, tmp_path: Path, *overrides: str):
    return train(compose_cfg([*TINY, f"data.root={data}", "phase=head", "data.verify=false",
                              "trainer.num_sanity_val_steps=0", f"paths.output_dir={tmp_path / 'out'}",
                              f"run_dir={tmp_path / 'run'}", *overrides]))


def test_pseudo_labels_take_what_the_labelled_photos_leave_of_the_cap(tiny_data: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The eval view alone of each training photo (views=0), then two passes (eval view, mirrored) a test photo
    within ``max_images``: a sample of the 6 test photos; a threshold of 0 takes every one."""
    caplog.set_level(logging.INFO, logger="carnet.training.head_fit")
    summary = run_head(tiny_data, tmp_path, "head_fit.views=0", "head_fit.pseudo_label=0.0", "head_fit.max_images=34")
    fit = summary.head_fit
    assert fit["images"] == fit["photos"] == summary.num_train == 28  # 40 photos, 12 validate
    assert (fit["unlabelled"], fit["pseudo_labelled"]) == (3, 3)  # (34 - 28) / 2 passes
    messages = [r.getMessage() for r in caplog.records if r.name == "carnet.training.head_fit"]
    assert any("features of 3 unlabelled photos" in m for m in messages)
    assert any("+ 3 of 3 unlabelled photos it was sure of" in m for m in messages)


def test_labelled_photos_that_fill_the_cap_leave_no_pseudo_labels(tiny_data: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="carnet.training.head_fit")
    summary = run_head(tiny_data, tmp_path, "head_fit.views=0", "head_fit.pseudo_label=0.0", "head_fit.max_images=29")
    assert summary.num_train == 28 and "unlabelled" not in summary.head_fit  # one pass left, a photo needs two
    assert any("the labelled photos took head_fit.max_images" in r.getMessage() for r in caplog.records)


def test_without_test_photos_the_head_fits_on_the_labelled_ones(tiny_data: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "cars"
    shutil.copytree(tiny_data, data)
    (data / "sample-submission.csv").unlink()
    caplog.set_level(logging.INFO, logger="carnet.training.head_fit")
    summary = run_head(data, tmp_path, "head_fit.pseudo_label=0.9")
    assert summary.status == "completed" and "unlabelled" not in summary.head_fit
    assert any(r.getMessage().startswith("head fit: no unlabelled photos to pseudo-label") and "sample-submission.csv"
               in r.getMessage() for r in caplog.records)
