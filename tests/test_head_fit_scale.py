"""The head fit scales and says what it does (issue 21): at most ``head_fit.max_images`` images get features
computed, and it logs each view and each point of the L2 grid instead of staying silent for minutes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from carnet.training.head_fit import (
    batch_to_pad_to,
    capped_images,
    padded,
    passes_per_image,
    plan_images,
    sample_photos,
    unlabelled_photos,
)
from carnet.training.train import train
from tests.helpers.config import compose_cfg
from tests.helpers.overrides import TINY


def test_the_image_cap_takes_views_first_then_photos() -> None:
    assert plan_images(50, 4, 1500) == (50, 5)  # few photos: every view
    assert plan_images(300, 4, 1500) == (300, 5)
    assert plan_images(400, 4, 1500) == (400, 3)  # fewer augmented views
    assert plan_images(12449, 4, 1500) == (1500, 1)  # the competition: a sample, eval view only
    assert plan_images(12449, 4, None) == (12449, 5)


def test_the_cap_counts_forward_passes_at_several_scales() -> None:
    assert capped_images(1500, [1.0]) == 1500 and capped_images(None, [1.0, 1.29]) is None
    assert capped_images(1500, [1.0, 1.29]) == 563  # 1 + 1.29² = 2.66 passes an image
    assert plan_images(292, 4, capped_images(1500, [1.0, 1.29])) == (292, 1)  # 365 photos' training split: eval view
    assert plan_images(40, 4, capped_images(1500, [1.0, 1.29])) == (40, 5)  # few photos: unchanged


def test_the_few_shot_recipe_keeps_every_view_and_the_test_photos_within_its_cap() -> None:
    """experiment=few_shot's two scales cost 2.7 passes an image: its cap keeps 50 photos' every view and leaves
    the pseudo-labels the few-shot development set's 123 test photos (two views a photo), as measured; the
    default cap would not."""
    cfg = compose_cfg(["experiment=few_shot", "phase=head"])
    scales, cap, views = list(cfg.model.scales), cfg.head_fit.max_images, cfg.head_fit.views
    assert len(scales) == 2 and cfg.head_fit.enabled
    photos, per_photo = plan_images(50, views, capped_images(cap, scales))
    assert (photos, per_photo) == (50, views + 1)
    assert unlabelled_photos(cap, photos * per_photo * passes_per_image(scales), scales) >= 123
    default_cap = compose_cfg(["phase=head"]).head_fit.max_images
    photos, per_photo = plan_images(50, views, capped_images(default_cap, scales))
    assert per_photo < views + 1
    assert unlabelled_photos(default_cap, photos * per_photo * passes_per_image(scales), scales) < 123


def test_a_short_batch_padded_to_the_loaders_size_gives_its_own_features() -> None:
    """On a GPU with cudnn.benchmark the head fit pads a loader's last, short batch to the batch size (one input
    shape, one algorithm search); the padding rows must not change the real rows' features."""
    from torch import nn

    from carnet.models.network import CarNet, create_backbone

    torch.manual_seed(0)
    net = CarNet(create_backbone("test_efficientnet"), nn.Identity()).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        alone = net.features(images)
        within = padded(net.features, images, 8)
        assert within.shape == alone.shape
        torch.testing.assert_close(within, alone, rtol=1e-4, atol=1e-5)
        assert torch.equal(padded(net.features, images, None), alone)  # no padding asked: the batch as it is
    assert batch_to_pad_to(32, torch.device("cpu")) is None  # the CPU searches for no algorithms: no padding
    # opt-in (head_fit.pad_batches, off by default until measured on a GPU): a head fit that was not asked pads nothing
    from carnet.training.head_fit import HeadFit

    assert compose_cfg(["phase=head"]).head_fit.pad_batches is False
    assert HeadFit(views=0, folds=2, max_images=None, seed=0, pseudo_label=None).pad_to(32, torch.device("cpu")) is None


def test_a_sample_of_photos_keeps_every_class_in_proportion() -> None:
    labels = np.repeat(np.arange(10), [500] * 9 + [20])
    chosen = sample_photos(labels, 1000, seed=0)
    counts = np.bincount(labels[chosen], minlength=10)
    assert len(set(chosen)) == len(chosen) and counts.min() >= 1 and abs(counts[:9] - 1000 * 500 / 4520).max() <= 1


def test_the_head_fit_reports_progress_and_keeps_to_its_cap(tiny_data: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="carnet.training.head_fit")
    summary = train(compose_cfg([*TINY, f"data.root={tiny_data}", "phase=head", "head_fit.views=4",
                                 "head_fit.max_images=50", "data.verify=false", "trainer.num_sanity_val_steps=0",
                                 f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}"]))
    fit = summary.head_fit
    assert fit["photos"] == summary.num_train and fit["views"] == 1 and fit["images"] == summary.num_train <= 50
    assert fit["features_seconds"] + fit["solver_seconds"] == pytest.approx(fit["seconds"], abs=0.2)
    # the features' time split: waiting for the loader, the forward passes (the first one apart), nothing else much
    assert 0 < fit["first_forward_seconds"] <= fit["forward_seconds"] + 0.05
    assert 0 < fit["loader_seconds"] + fit["forward_seconds"] <= fit["features_seconds"] + 0.2
    messages = [r.getMessage() for r in caplog.records if r.name == "carnet.training.head_fit"]
    assert any(m.startswith("head fit: features of view 1/1 (eval view)") for m in messages)
    assert any(m.startswith("head fit: L2 ") and "of the grid" in m for m in messages)


def test_a_multi_scale_head_fit_keeps_to_its_cap_in_forward_passes(tiny_data: Path, tmp_path: Path) -> None:
    """Scales [1, 2] cost 5 passes an image, so a cap of 50 leaves 10 images: a sample of one photo a class, in the
    eval view, each at both scales."""
    summary = train(compose_cfg([*TINY, f"data.root={tiny_data}", "phase=head", "head_fit.views=4",
                                 "head_fit.max_images=50", "model.scales=[1,2]", "data.verify=false",
                                 "trainer.num_sanity_val_steps=0", f"paths.output_dir={tmp_path / 'out'}",
                                 f"run_dir={tmp_path / 'run'}"]))
    fit = summary.head_fit
    assert summary.num_train > 10 and (fit["photos"], fit["views"], fit["scales"], fit["images"]) == (10, 1, 2, 20)


def test_a_head_fit_on_padded_batches_fits_the_same_head(tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The padding a GPU run uses (cudnn.benchmark), forced on the CPU: batches of 5 leave every loader a short last
    batch (the labelled photos' views, the unlabelled photos for the pseudo-labels), and the head fit must find
    the same features, photos and head as without it."""
    import carnet.training.head_fit as head_fit

    def fit(name: str, *overrides: str) -> dict:
        return train(compose_cfg([*TINY, f"data.root={tiny_data}", "phase=head", "head_fit.views=2",
                                  "data.batch_size=5", "data.verify=false", "trainer.num_sanity_val_steps=0",
                                  f"paths.output_dir={tmp_path / name}", f"run_dir={tmp_path / name / 'run'}",
                                  *overrides])).head_fit

    plain = fit("plain")
    monkeypatch.setattr(head_fit, "batch_to_pad_to", lambda batch_size, device: int(batch_size))
    with_padding = fit("padded", "head_fit.pad_batches=true")
    keys = ("photos", "views", "images", "l2", "cv_loss", "train_acc", "unlabelled", "pseudo_labelled")
    assert plain["photos"] % 5 and plain["unlabelled"] % 5  # short last batches, padded in the second run
    assert {k: with_padding[k] for k in keys} == {k: plain[k] for k in keys}
