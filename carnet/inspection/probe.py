"""Out-of-fold class probabilities of every labelled photo from a linear probe on frozen features.

Finding label errors needs, for each photo, probabilities from a model that never saw that photo's label
(cleanlab's ``find_label_issues`` ranks photos by how little such a model believes their given label). A k-fold
sweep provides them; without one, a linear probe does in seconds: features of every photo are computed once by a
backbone that never trained on these labels (its ImageNet weights), and multinomial logistic regression is fitted
k times, each time predicting the fold it left out. The solver, the stratified photo folds and the cross-validated
L2 strength are head_fit's (the head phase's own linear fit), not a second copy.

A backbone fine-tuned on these photos would be the wrong one: it has learnt their labels, wrong ones included, so
a mislabelled photo sits among its given class in its features and the probe agrees with the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from carnet.errors import CarnetError, DataError
from carnet.inference.runner import Runner
from carnet.inference.selection import Images
from carnet.models.hub import check_pretrained_available
from carnet.models.network import CarNet, create_backbone
from carnet.training.head_fit import L2_GRID, choose_l2, fit_logistic, photo_folds, single_thread, standardised

# Every other strength of head_fit's grid (a decade apart): half the fits, and a ranking of photos needs no finer L2.
PROBE_GRID = L2_GRID[::2]


@dataclass
class Backbone:
    """The network whose pooled features the probe fits on, the view it needs, and where its weights came from."""

    net: CarNet
    meta: dict[str, Any]  # image_size, mean, std, interpolation, crop_pct: predict's loader reads them
    source: str  # said on the page
    label_free: bool  # True: the weights never saw these labels (ImageNet); False: the checkpoint's own


def pretrained_backbone(model_name: str, image_size: int, weights: str | None = None,
                        pretrained: bool = True) -> Backbone:
    """``model_name``'s ImageNet backbone: from a local ``weights`` file, else timm's cached or downloaded weights
    (an error in a second when neither is there: :func:`check_pretrained_available`)."""
    if weights:
        backbone, source = create_backbone(model_name, weights=weights), f"{model_name}, weights {weights}"
    elif pretrained:
        check_pretrained_available(model_name)
        backbone, source = create_backbone(model_name, pretrained=True), f"{model_name}, timm's pretrained weights"
    else:
        raise CarnetError(f"{model_name} has no pretrained weights here (model.pretrained=false and no "
                          f"model.weights): pass --weights FILE, a local state dict in timm's key names")
    config = timm.data.resolve_model_data_config(backbone)
    meta = {"image_size": int(image_size), "mean": list(config["mean"]), "std": list(config["std"]),
            "interpolation": config.get("interpolation", "bicubic"), "crop_pct": float(config.get("crop_pct", 1.0))}
    return Backbone(CarNet(backbone, nn.Identity()), meta, source, True)


def probe_backbone(model_name: str, image_size: int, weights: str | None, pretrained: bool,
                   fallback: tuple[CarNet, dict[str, Any], str] | None = None) -> Backbone:
    """The probe's backbone: the ImageNet one the model started from (``weights`` if that file is here, else timm's
    pretrained weights); when neither can be had and a checkpoint is given as ``fallback`` (net, meta, path), that
    checkpoint's own backbone, which has learnt these labels (wrong ones included), so it finds fewer errors."""
    if weights and not Path(weights).is_file():
        weights = None  # recorded by the run, relative to where it ran: timm's weights, else the fallback
    try:
        return pretrained_backbone(model_name, image_size, weights, pretrained)
    except CarnetError as err:
        if fallback is None:
            raise
        net, meta, path = fallback
        why = str(err).split(":")[0]
        return Backbone(net, meta, f"the backbone of {path} ({why}; --weights FILE gives the ImageNet one)", False)


@torch.inference_mode()
def frozen_features(net: CarNet, images: Images, meta: dict[str, Any], runner: Runner,
                    progress: Progress | None = None) -> torch.Tensor:
    """Pooled backbone features (images, features) of ``images`` in the evaluation view ``meta`` describes
    (size, normalisation, interpolation, crop): predict's loader, so a broken file is named as predict names it."""
    net = runner.prepare(net)
    task = progress.add_task(f"features {images.what}", total=len(images.paths)) if progress else None
    rows, seen = [], 0
    for batch, _, errors in runner.loader(images, meta):
        bad = next((i for i, e in enumerate(errors) if e), None)
        if bad is not None:
            raise DataError(f"cannot decode image {images.root / images.paths[seen + bad]} ({errors[bad]}); "
                            f"replace or remove the file")
        rows.append(net.features(batch.to(runner.device)).float().cpu())
        seen += len(batch)
        if progress is not None:
            progress.advance(task, len(batch))
    return torch.cat(rows)


@dataclass
class ProbeResult:
    """Out-of-fold probabilities (photos, classes) and how they were made."""

    probs: np.ndarray
    l2: float
    folds: int
    cv_loss: float


def probe_oof(features: torch.Tensor, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
              grid: tuple[float, ...] = PROBE_GRID) -> ProbeResult:
    """Each photo's class probabilities from a logistic regression fitted on the other folds' photos.

    Features are standardised; the L2 strength is chosen by head_fit's k-fold log-loss over these same photos
    (their given labels, noisy ones included: nothing else is known), then the folds are refitted at that
    strength. A class with fewer photos than ``folds`` lowers the number of folds (at least 2).
    """
    y = torch.as_tensor(np.array(labels, dtype=np.int64))
    counts = np.bincount(y.numpy(), minlength=num_classes)
    present = counts[counts > 0]
    folds = int(min(folds, present.min())) if len(present) else 0
    if folds < 2 or len(present) < 2:
        raise DataError(f"the probe needs at least 2 classes with 2 photos each to cross-validate; class counts "
                        f"{counts.tolist()}")
    z, _, _ = standardised(features)
    groups = np.arange(len(y))
    fold_of = torch.as_tensor(photo_folds(groups, y.numpy(), folds, seed))
    probs = torch.zeros(len(y), num_classes, dtype=torch.double)
    with single_thread(z.device):
        l2, losses = choose_l2(z, y, groups, num_classes, grid, folds=folds, seed=seed)
        for k in range(folds):
            held = fold_of == k
            weight, bias = fit_logistic(z[~held], y[~held], num_classes, l2)
            probs[held] = F.softmax(z[held].double() @ weight + bias, dim=1)
    return ProbeResult(probs.numpy(), float(l2), folds, float(losses.get(l2, float("nan"))))
